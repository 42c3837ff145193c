"""Per-organ statistics of a label map and its scan on the same voxel grid (as TotalSegmentator's --statistics):
volume, intensity mean / SD / median (HU for CT as read), world bounding box in mm and 3D connected components.

An organ found nowhere gets a row that says so (`present: False`, volume 0, statistics None), never a bare 0 mL.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
from scipy import ndimage

from medclipsam.inference.report import voxel_volume_ml

_AXES = ("x", "y", "z")
BBOX_COLUMNS = tuple(f"bbox_{end}_{axis}_mm" for end in ("min", "max") for axis in _AXES)
STATISTICS_COLUMNS = ("present", "intensity_mean", "intensity_sd", "intensity_median", *BBOX_COLUMNS, "components")
_CONNECTIVITY_26 = np.ones((3, 3, 3), dtype=bool)
_DECIMALS = 3


def _grid_array(values: Any, name: str) -> np.ndarray:
    """A 3D numpy view of an (X, Y, Z) or (1, X, Y, Z) array or tensor."""
    array = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 3:
        raise ValueError(f"{name} must be a 3D (X, Y, Z) or (1, X, Y, Z) array, got shape {array.shape}")
    return array


def _absent_row(concept: str, value: int) -> dict:
    row: dict[str, Any] = {"concept": concept, "label": int(value), "present": False, "voxels": 0, "volume_ml": 0.0,
                           "intensity_mean": None, "intensity_sd": None, "intensity_median": None}
    row.update(dict.fromkeys(BBOX_COLUMNS))
    row["components"] = 0
    return row


def _present_row(concept: str, value: int, mask: np.ndarray, corner: Sequence[int], intensities: np.ndarray,
                 affine: np.ndarray, voxel_ml: float) -> dict:
    """Statistics of one organ whose mask is `mask`, a crop of the grid starting at index `corner`."""
    inside = intensities.astype(np.float64)
    index = np.argwhere(mask) + np.asarray(corner)
    world = index @ affine[:3, :3].T + affine[:3, 3]
    _, components = ndimage.label(mask, structure=_CONNECTIVITY_26)
    row: dict[str, Any] = {
        "concept": concept, "label": int(value), "present": True, "voxels": int(index.shape[0]),
        "volume_ml": round(index.shape[0] * voxel_ml, _DECIMALS),
        "intensity_mean": round(float(inside.mean()), _DECIMALS),
        "intensity_sd": round(float(inside.std()), _DECIMALS),
        "intensity_median": round(float(np.median(inside)), _DECIMALS),
    }
    bounds = np.concatenate([world.min(axis=0), world.max(axis=0)])
    row.update({column: round(float(v), _DECIMALS) for column, v in zip(BBOX_COLUMNS, bounds)})
    row["components"] = int(components)
    return row


def organ_statistics(labels: Any, intensities: Any, affine: Any, label_values: Mapping[str, int]) -> list[dict]:
    """One row per concept of a label map and its scan (same (X, Y, Z) grid, the scan's 4x4 RAS affine).

    volume_ml = voxels x voxel volume; intensity mean, population SD and median over the organ's voxels (HU for CT);
    bbox_* = min / max world RAS coordinates (mm) of the organ's voxel centres; components = 3D connected components
    with 26-connectivity. A concept with no voxel gives `present: False`, volume 0, statistics and box None.
    """
    labels = _grid_array(labels, "labels")
    intensities = _grid_array(intensities, "intensities")
    if labels.shape != intensities.shape:
        raise ValueError(f"labels {labels.shape} and intensities {intensities.shape} are not on the same grid")
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, got {affine.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        labels = np.rint(labels).astype(np.int64)
    wanted = [int(v) for v in label_values.values() if int(v) > 0]
    boxes = ndimage.find_objects(labels, max_label=max(wanted, default=0))
    voxel_ml = voxel_volume_ml(affine)
    rows = []
    for concept, value in label_values.items():
        box = boxes[value - 1] if 0 < value <= len(boxes) else None
        if box is None:
            rows.append(_absent_row(concept, value))
            continue
        mask = labels[box] == value
        corner = [s.start for s in box]
        rows.append(_present_row(concept, value, mask, corner, intensities[box][mask], affine, voxel_ml))
    return rows


def merge_statistics(report_rows: Sequence[Mapping[str, Any]], statistics_rows: Sequence[Mapping[str, Any]]
                     ) -> list[dict]:
    """The report rows (`volume_report`) with each concept's STATISTICS_COLUMNS added; the report's own values
    (voxels, volume, slices, confidence) are kept, so an absent organ keeps its confidence and reads present: False."""
    by_concept = {row["concept"]: row for row in statistics_rows}
    merged = []
    for row in report_rows:
        statistics = by_concept.get(row["concept"])
        if statistics is None:
            raise ValueError(f"no statistics row for concept {row['concept']!r}")
        if statistics["voxels"] != row["voxels"]:
            raise ValueError(f"concept {row['concept']!r}: the report counts {row['voxels']} voxels but the "
                             f"statistics {statistics['voxels']}; they were made from different label maps")
        merged.append({**row, **{column: statistics[column] for column in STATISTICS_COLUMNS}})
    return merged
