"""Figures for notebooks and reports: label overlays on axial slices, prompt-consistency bars, and Dice against the
number of labelled volumes. Each function returns a matplotlib Figure; nothing is shown or written here."""
from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from medclipsam.inference.preview import colour, draw_slice

SETTING_NAMES = {"text": "evaluated text-only", "box": "evaluated with boxes"}


def _channel_first(volume: torch.Tensor | np.ndarray) -> torch.Tensor:
    tensor = torch.as_tensor(np.asarray(volume)) if not isinstance(volume, torch.Tensor) else volume
    return tensor if tensor.ndim == 4 else tensor[None]


def spread_slices(labels: torch.Tensor | np.ndarray, count: int = 3) -> list[int]:
    """`count` axial slice indices spread evenly over the slices where any label is present (all slices if none)."""
    volume = _channel_first(labels)[0]
    present = torch.nonzero(volume.reshape(-1, volume.shape[-1]).ne(0).any(dim=0)).flatten().tolist()
    candidates = present or list(range(volume.shape[-1]))
    if len(candidates) <= count:
        return candidates
    positions = np.linspace(0, len(candidates) - 1, count + 2)[1:-1]
    return sorted({candidates[int(round(p))] for p in positions})


def overlay_figure(image: torch.Tensor | np.ndarray, panels: Mapping[str, torch.Tensor | np.ndarray],
                   label_names: Mapping[int, str], slices: Sequence[int] | None = None,
                   panel_size: float = 3.2) -> Figure:
    """Axial slices (rows) of a RAS [0, 1] volume with each label map of `panels` (columns, e.g. truth, a method)
    drawn over it (`medclipsam.inference.preview.draw_slice`, the renderer of `segment --preview`); only the label
    values of `label_names` are drawn and named in the legend; `slices` default to three spread over where the first
    panel has labels."""
    image = _channel_first(image)
    maps = {title: _channel_first(labels).long() for title, labels in panels.items()}
    slices = list(slices) if slices is not None else spread_slices(next(iter(maps.values())))
    spacing = [float(s) for s in getattr(image, "pixdim", [1.0, 1.0, 1.0])[:2]]
    figure, axes = plt.subplots(len(slices), len(maps), figsize=(panel_size * len(maps), panel_size * len(slices)),
                                squeeze=False)
    seen: set[int] = set()
    for row, index in enumerate(slices):
        for column, (title, labels) in enumerate(maps.items()):
            ax = axes[row][column]
            seen |= draw_slice(ax, image, labels, index, label_names, aspect=spacing[1] / spacing[0])
            ax.set_title(f"{title}, slice {index}", fontsize=9)
    handles = [Patch(color=colour(v), label=label_names.get(v, str(v))) for v in sorted(seen)]
    if handles:
        figure.legend(handles=handles, loc="lower center", ncol=min(len(handles), 5), fontsize=8, frameon=False)
    figure.tight_layout(rect=(0, 0.06 if handles else 0, 1, 1))
    return figure


def prompt_consistency_figure(rows: Sequence[Mapping]) -> Figure:
    """Grouped bars of mean Dice: one group per prompt mode trained with, one bar per evaluation setting
    (rows from `medclipsam.experiments.prompt_consistency.consistency_rows`)."""
    modes = list(dict.fromkeys(r["trained_with"] for r in rows))
    settings = list(dict.fromkeys(r["evaluated"] for r in rows))
    figure, ax = plt.subplots(figsize=(1.8 + 1.6 * len(modes), 3.4))
    width = 0.8 / len(settings)
    for s, setting in enumerate(settings):
        means = [np.mean([r["dice"] for r in rows if (r["trained_with"], r["evaluated"]) == (mode, setting)])
                 for mode in modes]
        bars = ax.bar(np.arange(len(modes)) + (s - (len(settings) - 1) / 2) * width, means, width,
                      label=SETTING_NAMES.get(setting, f"evaluated {setting}"))
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_xticks(np.arange(len(modes)), [f"trained {'text-only' if m == 'text' else m}" for m in modes])
    ax.set_ylabel("mean Dice over organs")
    ax.set_ylim(0, 1.25)
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.legend(fontsize=8, loc="upper center", ncol=len(settings), frameon=False)
    figure.tight_layout()
    return figure


def dice_vs_labelled_figure(rows: Sequence[Mapping]) -> Figure:
    """Mean Dice over concepts (mean ± sd over seeds) against the number of labelled volumes, one line per method
    (rows with method, labelled, seed, concept, dice, as from `medclipsam.experiments.label_efficiency`)."""
    figure, ax = plt.subplots(figsize=(5.0, 3.4))
    for method in dict.fromkeys(r["method"] for r in rows):
        counts = sorted({r["labelled"] for r in rows if r["method"] == method})
        per_seed = [[np.mean([r["dice"] for r in rows if (r["method"], r["labelled"], r["seed"]) == (method, c, s)])
                     for s in sorted({r["seed"] for r in rows if (r["method"], r["labelled"]) == (method, c)})]
                    for c in counts]
        spread = [np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in per_seed]
        ax.errorbar(counts, [np.mean(v) for v in per_seed], yerr=spread, marker="o", capsize=3, label=method)
    counts = sorted({r["labelled"] for r in rows})
    ax.set_xscale("log", base=2)
    ax.set_xticks(counts, [str(c) for c in counts])
    ax.set_xlabel("labelled volumes")
    ax.set_ylabel("held-out Dice (mean over organs)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    figure.tight_layout()
    return figure


def comparison_boxplot_figure(rows: Sequence[Mapping], labelled: int) -> Figure:
    """Box plots per organ of the per-case Dice (top) and HD95 (bottom) of every method and setting at one labelled
    count (rows from `medclipsam.experiments.comparison.run_comparison`), one colour per method and setting."""
    rows = [r for r in rows if r["labelled"] == labelled]
    entries = list(dict.fromkeys((r["method"], r["setting"]) for r in rows))
    organs = list(dict.fromkeys(r["concept"] for r in rows))
    figure, axes = plt.subplots(2, 1, figsize=(min(16.0, max(6.0, 0.2 * len(organs) * len(entries))), 6.4))
    width = 0.8 / max(len(entries), 1)
    for ax, metric, label in ((axes[0], "dice", "Dice"), (axes[1], "hd95", "HD95 (mm)")):
        for e, (method, setting) in enumerate(entries):
            values = [[r[metric] for r in rows if (r["method"], r["setting"], r["concept"]) == (method, setting, o)]
                      for o in organs]
            positions = np.arange(len(organs)) + (e - (len(entries) - 1) / 2) * width
            parts = ax.boxplot(values, positions=positions, widths=width * 0.9, patch_artist=True, showfliers=False)
            for box in parts["boxes"]:
                box.set_facecolor(colour(e + 1))
        ax.set_xticks(np.arange(len(organs)), organs if metric == "hd95" else [], rotation=30, ha="right")
        ax.set_ylabel(label)
    axes[0].set_ylim(0, 1)
    axes[0].set_title(f"{labelled} labelled volume{'s' if labelled != 1 else ''}: per held-out case", fontsize=10)
    handles = [Patch(color=colour(e + 1), label=f"{m} ({s})") for e, (m, s) in enumerate(entries)]
    figure.legend(handles=handles, fontsize=7, ncol=min(len(handles), 6), loc="lower center", frameon=False)
    figure.tight_layout(rect=(0, 0.04 * (1 + (len(handles) - 1) // 6), 1, 1))
    return figure
