"""Per-case, per-concept segmentation metrics (Dice, HD95, NSD via monai.metrics) and tidy result tables."""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_surface_dice
from monai.utils import convert_to_tensor

from medclipsam.atomic import atomic_write
from medclipsam.errors import InputError, OutputExistsError

METRIC_NAMES = ("dice", "hd95", "nsd")
TABLE_FORMATS = ("csv", "md")


def _as_bool_volume(mask: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A (X, Y, Z) mask as a boolean torch tensor on the CPU."""
    return convert_to_tensor(mask, track_meta=False).detach().cpu().bool()


def _image_diagonal_mm(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """Length in mm of the diagonal of the image grid: the worst finite surface distance."""
    return float(math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing))))


def segmentation_metrics(
    pred: np.ndarray | torch.Tensor,
    truth: np.ndarray | torch.Tensor,
    spacing: tuple[float, float, float],
    nsd_tolerance_mm: float = 2.0,
) -> dict[str, float]:
    """Dice, HD95 (mm) and normalised surface Dice (at `nsd_tolerance_mm`) of one binary 3D mask against the truth.

    Empty masks have defined values so that means over cases stay finite:
    both empty → dice 1, hd95 0, nsd 1 (nothing to find, nothing found);
    exactly one empty → dice 0, hd95 = the image diagonal in mm (worst possible finite distance), nsd 0.
    """
    pred_t, truth_t = _as_bool_volume(pred), _as_bool_volume(truth)
    if pred_t.shape != truth_t.shape or pred_t.ndim != 3:
        raise ValueError(
            f"prediction {tuple(pred_t.shape)} and truth {tuple(truth_t.shape)} must be 3D masks of the same shape"
        )
    spacing = tuple(float(s) for s in spacing)
    pred_empty, truth_empty = not bool(pred_t.any()), not bool(truth_t.any())
    if pred_empty and truth_empty:
        return {"dice": 1.0, "hd95": 0.0, "nsd": 1.0}
    if pred_empty or truth_empty:
        return {"dice": 0.0, "hd95": _image_diagonal_mm(pred_t.shape, spacing), "nsd": 0.0}

    y_pred = pred_t[None, None].float()
    y = truth_t[None, None].float()
    dice = compute_dice(y_pred, y, include_background=True)
    hd95 = compute_hausdorff_distance(y_pred, y, include_background=True, percentile=95, spacing=spacing)
    nsd = compute_surface_dice(
        y_pred, y, class_thresholds=[float(nsd_tolerance_mm)], include_background=True, spacing=spacing
    )
    return {"dice": float(dice.item()), "hd95": float(hd95.item()), "nsd": float(nsd.item())}


def evaluate_case(
    pred_labels: np.ndarray | torch.Tensor,
    truth_labels: np.ndarray | torch.Tensor,
    spacing: tuple[float, float, float],
    label_map: Mapping[int, str],
    case_id: str,
    method: str = "",
    nsd_tolerance_mm: float = 2.0,
) -> list[dict]:
    """One row per concept of `label_map` (background 0 skipped) comparing two label volumes of one case."""
    pred_arr = np.asarray(pred_labels.detach().cpu() if isinstance(pred_labels, torch.Tensor) else pred_labels)
    truth_arr = np.asarray(truth_labels.detach().cpu() if isinstance(truth_labels, torch.Tensor) else truth_labels)
    pred_arr, truth_arr = np.squeeze(pred_arr), np.squeeze(truth_arr)
    rows = []
    for label_id in sorted(int(k) for k in label_map):
        if label_id == 0:
            continue
        pred_mask, truth_mask = pred_arr == label_id, truth_arr == label_id
        scores = segmentation_metrics(pred_mask, truth_mask, spacing, nsd_tolerance_mm)
        rows.append(
            {
                "case_id": case_id,
                "method": method,
                "label_id": label_id,
                "concept": label_map[label_id],
                **scores,
                "pred_voxels": int(pred_mask.sum()),
                "truth_voxels": int(truth_mask.sum()),
            }
        )
    return rows


def mean_and_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value)."""
    arr = np.asarray(values, dtype=np.float64)
    sd = float(arr.std(ddof=1)) if arr.size > 1 else 0.0
    return float(arr.mean()), sd


def summarize(rows: Iterable[Mapping]) -> list[dict]:
    """Mean and sample sd of each metric per (method, concept), then an "all" row per method over all its rows."""
    groups: dict[tuple[str, str], list[Mapping]] = {}
    for row in rows:
        groups.setdefault((str(row.get("method", "")), str(row["concept"])), []).append(row)
    methods = sorted({method for method, _ in groups})
    summary = []
    for method in methods:
        concepts = sorted(concept for m, concept in groups if m == method)
        method_rows = [row for concept in concepts for row in groups[(method, concept)]]
        for concept, members in [(c, groups[(method, c)]) for c in concepts] + [("all", method_rows)]:
            entry: dict = {"method": method, "concept": concept, "n": len(members)}
            for name in METRIC_NAMES:
                entry[f"{name}_mean"], entry[f"{name}_sd"] = mean_and_sd([float(r[name]) for r in members])
            summary.append(entry)
    return summary


def _columns(rows: Sequence[Mapping]) -> list[str]:
    """Union of the rows' keys in order of first appearance."""
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    return list(columns)


def _format_cell(value: object) -> str:
    """A table cell: floats to 4 decimals, everything else as text."""
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _render(rows: Sequence[Mapping], fmt: str) -> str:
    """The table text in CSV (full precision) or Markdown (4 decimals)."""
    columns = _columns(rows)
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return buffer.getvalue()
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(" --- " for _ in columns) + "|"]
    lines += ["| " + " | ".join(_format_cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_table(rows: Sequence[Mapping], path: str | Path, fmt: str = "csv", overwrite: bool = False) -> Path:
    """Write result rows as a CSV or Markdown table, atomically (temp file + rename); refuses to overwrite unless asked."""
    path = Path(path)
    if fmt not in TABLE_FORMATS:
        raise InputError(path, f"unknown table format {fmt!r}", f"use one of {', '.join(TABLE_FORMATS)}")
    if not rows:
        raise InputError(path, "no result rows to write", "evaluate at least one case before writing the table")
    if path.exists() and not overwrite:
        raise OutputExistsError(path, "the table already exists; pass overwrite=True or choose another path")
    path.parent.mkdir(parents=True, exist_ok=True)
    text = _render(rows, fmt)
    atomic_write(path, lambda temp: Path(temp).write_text(text, encoding="utf-8", newline=""))
    return path
