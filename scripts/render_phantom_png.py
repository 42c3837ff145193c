"""Render a synthetic CT phantom as a PNG: three axial slices with label contours and a coronal view, or, with
--scanner, three axial slices of each of three scanner phantoms (seeds N, N+1, N+2) as plain CT.

Usage: python scripts/render_phantom_png.py docs/phantom.png [--seed N]
       python scripts/render_phantom_png.py docs/scanner_phantom.png --scanner [--seed N]
Axial slices are shown in radiological convention (patient's right on the viewer's left, anterior up).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from medclipsam.data.phantom import Phantom, make_phantom, make_scanner_phantom  # noqa: E402

WINDOW = (40.0, 400.0)  # abdomen level / width in HU
CONTOUR_COLOURS = ["#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#ff00ff", "#e377c2", "#bcbd22", "#17becf",
                   "#1f77b4", "#ffff33"]


def colour(label_id: int) -> str:
    """Contour colour of a label id (bright colours that stand out on grey CT)."""
    return CONTOUR_COLOURS[(label_id - 1) % len(CONTOUR_COLOURS)]


def windowed(hu: np.ndarray) -> np.ndarray:
    """Map HU to 0..1 with the abdomen window."""
    level, width = WINDOW
    return np.clip((hu - (level - width / 2)) / width, 0.0, 1.0)


def axial_view(volume: np.ndarray, k: int) -> np.ndarray:
    """Axial slice k as an image: rows anterior->posterior, columns patient right->left."""
    return volume[:, :, k].T[::-1, ::-1]


def coronal_view(volume: np.ndarray, j: int) -> np.ndarray:
    """Coronal slice j as an image: rows superior->inferior, columns patient right->left."""
    return volume[:, j, :].T[::-1, ::-1]


def pick_axial_slices(phantom: Phantom) -> list[int]:
    """Three slices through the upper abdomen (liver/spleen), the kidneys/pancreas and the lower abdomen."""
    depth = phantom.label.shape[2]
    return [int(round(depth * f)) for f in (0.78, 0.5, 0.3)]


def render(phantom: Phantom, title: str) -> plt.Figure:
    """Figure with three axial slices with coloured label contours and a coronal view through the kidneys."""
    sx, sy, sz = phantom.spacing
    slices = pick_axial_slices(phantom)
    fig, axes = plt.subplots(1, 4, figsize=(17, 5.0), gridspec_kw={"width_ratios": [1, 1, 1, 1]})
    for ax, k in zip(axes[:3], slices):
        ax.imshow(windowed(axial_view(phantom.image, k)), cmap="gray", aspect=sy / sx, interpolation="bilinear")
        labels = axial_view(phantom.label, k)
        for label_id in np.unique(labels[labels > 0]):
            ax.contour(labels == label_id, levels=[0.5], colors=[colour(int(label_id))], linewidths=0.9)
        ax.set_title(f"axial slice {k} (z = {k * sz:.0f} mm from bottom)", fontsize=9)
        ax.text(2, 6, "R", color="yellow", fontsize=10)
        ax.text(labels.shape[1] - 8, 6, "L", color="yellow", fontsize=10)
        ax.axis("off")
    kidney_rows = np.where(np.isin(phantom.label, [3, 4]).any(axis=(0, 2)))[0]
    j = int(np.median(kidney_rows)) if kidney_rows.size else phantom.label.shape[1] // 2
    axes[3].imshow(windowed(coronal_view(phantom.image, j)), cmap="gray", aspect=sz / sx, interpolation="bilinear")
    coronal = coronal_view(phantom.label, j)
    for label_id in np.unique(coronal[coronal > 0]):
        axes[3].contour(coronal == label_id, levels=[0.5], colors=[colour(int(label_id))], linewidths=0.9)
    for k in slices:
        axes[3].axhline(phantom.label.shape[2] - 1 - k, color="cyan", linewidth=0.6, linestyle="--")
    axes[3].set_title(f"coronal slice {j} through the kidneys (dashed: the axial slices)", fontsize=9)
    axes[3].axis("off")
    handles = [plt.Line2D([], [], color=colour(i), label=name) for i, name in phantom.label_names.items()]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    return fig


def render_scanner(phantoms: dict[int, Phantom]) -> plt.Figure:
    """One row per scanner phantom (seed -> phantom): three axial slices in the abdomen window at true pixel size,
    each row titled with its scanner geometry."""
    fig, axes = plt.subplots(len(phantoms), 3, figsize=(13, 4.5 * len(phantoms)), squeeze=False)
    for row, (seed, phantom) in zip(axes, phantoms.items()):
        g = phantom.geometry
        depth = phantom.image.shape[2]
        for ax, fraction in zip(row, (0.78, 0.5, 0.3)):
            k = int(round((depth - 1) * fraction))
            z = phantom.affine[2, 3] + k * phantom.affine[2, 2]
            ax.imshow(windowed(axial_view(phantom.image, k)), cmap="gray", interpolation="bilinear")
            ax.set_title(f"seed {seed}, z = {z:.0f} mm", fontsize=9)
            ax.axis("off")
        row[1].text(0.5, -0.06, f"{g.matrix} x {g.matrix} at {g.pixel_mm:.2f} mm (FOV {g.fov_mm:.0f} mm), "
                    f"{g.slice_mm:g} mm slices; {g.table} table, pad {g.pad_mm:.0f} mm, gap {g.gap_mm:.0f} mm; "
                    f"arms {g.arms}; offset ({g.offset_mm[0]:.0f}, {g.offset_mm[1]:.0f}) mm; {g.phase}; "
                    f"noise {g.noise_hu:.0f} HU", transform=row[1].transAxes, ha="center", va="top", fontsize=8)
    fig.suptitle("medclipsam scanner phantoms: abdomen window W400/L40, radiological view (patient right on the "
                 "left), anatomy at physical size", fontsize=11)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.03, top=0.94, wspace=0.03, hspace=0.22)
    return fig


def save(fig: plt.Figure, out: Path) -> None:
    """Save a figure as PNG atomically (a temp file renamed into place) and close it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp.png")
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
        plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, render and save the PNG atomically."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="PNG file to write, e.g. docs/phantom.png")
    parser.add_argument("--seed", type=int, default=0, help="phantom seed (default 0)")
    parser.add_argument("--scanner", action="store_true",
                        help="render scanner phantoms of seeds N, N+1, N+2, each with the geometry its seed draws")
    args = parser.parse_args(argv)
    if args.scanner:
        fig = render_scanner({seed: make_scanner_phantom(seed) for seed in range(args.seed, args.seed + 3)})
    else:
        phantom = make_phantom(args.seed)
        title = (f"medclipsam synthetic CT phantom, seed {args.seed}: {phantom.image.shape} voxels at "
                 f"{phantom.spacing} mm, abdomen window W400/L40, radiological view (patient right on the left)")
        fig = render(phantom, title)
    save(fig, args.out)
    print(args.out)


if __name__ == "__main__":
    main()
