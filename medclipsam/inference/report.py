"""Per-concept report of a volume segmentation: label value, voxels, volume in mL, slice range, confidence."""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Sequence

from medclipsam.inference.segment import VolumeSegmentation
from medclipsam.training.checkpoints import atomic_write


def volume_report(result: VolumeSegmentation, spacing_mm: Sequence[float]) -> list[dict]:
    """One row per concept; volume = voxel count x voxel volume (spacing in mm, so / 1000 for mL)."""
    voxel_ml = math.prod(float(s) for s in spacing_mm) / 1000.0
    rows = []
    for concept, value in result.label_values.items():
        voxels = int((result.labels == value).sum())
        span = result.slice_range.get(concept)
        confidence = result.confidence.get(concept, float("nan"))
        rows.append({
            "concept": concept,
            "label": value,
            "voxels": voxels,
            "volume_ml": round(voxels * voxel_ml, 3),
            "first_slice": None if span is None else span[0],
            "last_slice": None if span is None else span[1],
            "confidence": None if math.isnan(confidence) else round(confidence, 4),
        })
    return rows


def write_report(rows: list[dict], json_path: str | Path, csv_path: str | Path) -> None:
    """Write the rows as JSON and CSV, each atomically."""
    text = json.dumps(rows, indent=2) + "\n"
    atomic_write(Path(json_path), lambda temp: Path(temp).write_text(text))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else ["concept"])
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(Path(csv_path), lambda temp: Path(temp).write_text(buffer.getvalue()))
