"""PNG overlay of a segmentation on a few axial slices (radiological view), for a quick visual check."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from medclipsam.data.slices import label_plane  # noqa: E402
from medclipsam.training.checkpoints import atomic_write  # noqa: E402

COLOURS = ["#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#ff00ff", "#e377c2", "#bcbd22", "#17becf", "#1f77b4",
           "#ffff33"]


def overlay_png(image01: torch.Tensor, labels: torch.Tensor, label_names: Mapping[int, str], path: str | Path,
                n_slices: int = 3) -> Path:
    """Write `n_slices` axial slices of a RAS (1, X, Y, Z) [0, 1] volume with label contours; returns the path."""
    labels = labels.reshape(image01.shape)
    per_slice = (labels[0] > 0).sum((0, 1))
    order = [int(i) for i in torch.argsort(per_slice, descending=True)[: max(n_slices * 4, 1)]]
    chosen = sorted(order[:: max(len(order) // n_slices, 1)][:n_slices])
    fig, axes = plt.subplots(1, len(chosen), figsize=(5 * len(chosen), 5), squeeze=False)
    spacing = [float(s) for s in getattr(image01, "pixdim", [1.0, 1.0, 1.0])[:2]]
    for ax, index in zip(axes[0], chosen):
        ax.imshow(label_plane(image01, 2, index).numpy(), cmap="gray", vmin=0, vmax=1,
                  aspect=spacing[1] / spacing[0])
        plane = label_plane(labels, 2, index).numpy()
        for value in np.unique(plane[plane > 0]):
            colour = COLOURS[(int(value) - 1) % len(COLOURS)]
            ax.contour(plane == value, levels=[0.5], colors=[colour], linewidths=1.2)
            ys, xs = np.nonzero(plane == value)
            ax.text(xs.mean(), ys.mean(), label_names.get(int(value), str(value)), color=colour, fontsize=7,
                    ha="center", va="center")
        ax.set_title(f"axial slice {index}")
        ax.axis("off")
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda temp: fig.savefig(temp, dpi=90, format="png"))
    plt.close(fig)
    return path
