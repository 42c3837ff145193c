"""Per-concept report of a label map on the scan's own voxel grid: label value, whether it was found, voxels, volume
in mL, axial slice range, mean confidence and how it was prompted; written as JSON (with the scan's details) and CSV
(one row per concept, with any extra columns the rows carry, e.g. the statistics)."""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Mapping

import nibabel as nib
import numpy as np

from medclipsam.atomic import atomic_write

REPORT_COLUMNS = ("prompt", "concept", "label", "present", "voxels", "volume_ml", "first_slice", "last_slice",
                  "confidence", "segmented_by")


def voxel_volume_ml(affine: np.ndarray) -> float:
    """Volume of one voxel in mL (|det| of the affine's 3x3 part in mm³, / 1000)."""
    return abs(float(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3]))) / 1000.0


def axial_axis(affine: np.ndarray) -> int:
    """The voxel axis closest to the patient's inferior-superior direction (along which axial slices are stacked)."""
    codes = nib.orientations.aff2axcodes(np.asarray(affine, dtype=np.float64))
    return next(i for i, code in enumerate(codes) if code in ("S", "I"))


def volume_report(labels: np.ndarray, affine: np.ndarray, label_values: Mapping[str, int],
                  confidence: Mapping[str, float], prompts: Mapping[str, str] | None = None,
                  segmented_by: Mapping[str, str] | None = None) -> list[dict]:
    """One row per concept of a label map in a scan's own voxel order with that scan's affine: present says whether
    it has any voxel (an absent organ is never a bare 0 mL); volume = voxel count x voxel volume; first/last slice are
    indices along the file's axial axis (NaN confidence becomes None); segmented_by: "name" unless a "box" or
    "points" prompted it."""
    labels = np.asarray(labels)
    voxel_ml = voxel_volume_ml(affine)
    axis = axial_axis(affine)
    others = tuple(a for a in range(3) if a != axis)
    rows = []
    for concept, value in label_values.items():
        mask = labels == value
        present = np.flatnonzero(mask.any(axis=others))
        score = float(confidence.get(concept, float("nan")))
        rows.append({
            "prompt": (prompts or {}).get(concept, concept),
            "concept": concept,
            "label": int(value),
            "present": bool(present.size),
            "voxels": int(mask.sum()),
            "volume_ml": round(int(mask.sum()) * voxel_ml, 3),
            "first_slice": int(present[0]) if present.size else None,
            "last_slice": int(present[-1]) if present.size else None,
            "confidence": None if math.isnan(score) else round(score, 4),
            "segmented_by": (segmented_by or {}).get(concept, "name"),
        })
    return rows


def write_report(report: Mapping[str, Any], json_path: str | Path, csv_path: str | Path) -> None:
    """Write the whole report as JSON and its "concepts" rows as CSV (REPORT_COLUMNS first, then any other column the
    rows carry, in their order), each atomically."""
    text = json.dumps(report, indent=2) + "\n"
    atomic_write(Path(json_path), lambda temp: Path(temp).write_text(text, encoding="utf-8"))
    columns = dict.fromkeys(REPORT_COLUMNS)
    for row in report["concepts"]:
        columns.update(dict.fromkeys(row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(report["concepts"])
    atomic_write(Path(csv_path), lambda temp: Path(temp).write_text(buffer.getvalue(), encoding="utf-8"))
