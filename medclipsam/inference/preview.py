"""PNG overlay of a segmentation on a few axial slices (radiological view), for a quick visual check."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from medclipsam.atomic import atomic_write
from medclipsam.data.slices import view_plane

COLOURS = ("#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#ff00ff", "#e377c2", "#bcbd22", "#17becf", "#1f77b4",
           "#ffff33")


def colour(value: int) -> str:
    """The colour of label value `value` (1, 2, ...) in every figure medclipsam draws."""
    return COLOURS[(int(value) - 1) % len(COLOURS)]


def draw_slice(ax: Any, image01: Any, labels: Any, index: int, label_names: Mapping[int, str],
               aspect: float = 1.0) -> set[int]:
    """Axial slice `index` of a RAS [0, 1] volume on `ax` in viewing orientation, with each label's contour and name;
    returns the label values drawn."""
    ax.imshow(view_plane(image01, index).numpy(), cmap="gray", vmin=0, vmax=1, aspect=aspect)
    plane = view_plane(labels, index).numpy()
    drawn = {int(v) for v in np.unique(plane[plane > 0]) if int(v) in label_names}
    for value in sorted(drawn):
        ax.contour(plane == value, levels=[0.5], colors=[colour(value)], linewidths=1.2)
        ys, xs = np.nonzero(plane == value)
        ax.text(xs.mean(), ys.mean(), label_names[value], color=colour(value), fontsize=7, ha="center",
                va="center")
    ax.axis("off")
    return drawn


def _chosen_slices(labels: torch.Tensor, n_slices: int) -> list[int]:
    """`n_slices` axial slices spread over those with the most labelled voxels (the middle ones if none)."""
    per_slice = (labels > 0).sum((0, 1))
    depth = int(per_slice.numel())
    if not bool(per_slice.any()):
        return sorted({int(i) for i in np.linspace(0, depth - 1, n_slices + 2)[1:-1].round()})
    candidates = torch.argsort(per_slice, descending=True)[: max(n_slices * 4, 1)]
    candidates = [int(i) for i in candidates if per_slice[i] > 0]
    return sorted(candidates[:: max(len(candidates) // n_slices, 1)][:n_slices])


def overlay_png(image01: torch.Tensor, labels: torch.Tensor, label_names: Mapping[int, str], path: str | Path,
                n_slices: int = 3) -> Path:
    """Write axial slices of a RAS (1, X, Y, Z) [0, 1] volume with the contours of an (X, Y, Z) label map on it,
    titled by their superior position in mm; returns the path (written atomically)."""
    labels = torch.as_tensor(np.asarray(labels)).reshape(image01.shape[1:])
    affine = np.asarray(getattr(image01, "affine", np.eye(4)), dtype=np.float64)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    chosen = _chosen_slices(labels, n_slices)
    figure = Figure(figsize=(4 * len(chosen), 4))
    FigureCanvasAgg(figure)
    centre = (np.asarray(labels.shape, dtype=np.float64) - 1) / 2
    for column, index in enumerate(chosen, start=1):
        ax = figure.add_subplot(1, len(chosen), column)
        draw_slice(ax, image01, labels, index, label_names, aspect=spacing[1] / spacing[0])
        superior = float(affine[2, :3] @ np.array([centre[0], centre[1], index]) + affine[2, 3])
        ax.set_title(f"axial, S {superior:+.1f} mm", fontsize=9)
    figure.tight_layout()
    path = Path(path)
    atomic_write(path, lambda temp: figure.savefig(temp, dpi=90, format="png"))
    return path
