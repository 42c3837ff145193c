"""Label efficiency: methods trained on shrinking labelled subsets of one pool of training cases (the rest of the
pool unlabelled, for semi-supervised methods), scored by Dice on held-out cases, over training seeds.

Every method gets the same labelled slices, the same budget (steps, slices per step) and the same seeds; the seeds
vary only training (weights, slice order, noise), the split of the pool is fixed by `data_seed` and nested (the cases
labelled at 1 are among those labelled at 2). One seed of it is the method comparison (`experiments.comparison`); this
module adds the repetition over seeds and the tables. Used by
`benchmarks/mean_teacher_vs_supervised.py` and `notebooks/04_semi_supervised.ipynb`; the case pool is
`medclipsam.training.pipeline.CasePool`.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from medclipsam.data.concepts import ConceptCard
from medclipsam.experiments.comparison import run_comparison
from medclipsam.training.loop import TrainBudget
from medclipsam.training.pipeline import CasePool


def run_label_efficiency(pool: CasePool, card: ConceptCard, methods: Mapping[str, Mapping[str, Any]],
                         labelled_counts: Sequence[int], seeds: Sequence[int], steps: int, slices_per_step: int,
                         data_seed: int = 0, device: str | torch.device = "cpu",
                         progress: Callable[[str], None] | None = None) -> list[dict]:
    """The comparison (`medclipsam.experiments.comparison.run_comparison`, text setting) at every training seed; one
    row per (method, labelled count, seed, concept) with the Dice averaged over the held-out cases, the trainable
    parameters and the seconds of training and per volume."""
    rows = []
    for seed in seeds:
        budget = TrainBudget(steps=steps, slices_per_step=slices_per_step, seed=seed)
        result = run_comparison(pool, card, methods, labelled_counts, budget, settings=("text",), data_seed=data_seed,
                                device=device, progress=progress)
        rows += case_means(result.rows)
    return rows


def case_means(rows: Sequence[Mapping]) -> list[dict]:
    """Per-case rows averaged over the cases: one row per (method, labelled, seed, concept), in first-seen order."""
    groups: dict[tuple, list[Mapping]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["labelled"], row["seed"], row["concept"]), []).append(row)
    return [{"method": method, "labelled": count, "seed": seed, "concept": concept,
             "dice": float(np.mean([r["dice"] for r in members])),
             "trainable_parameters": members[0]["trainable_parameters"], "train_seconds": members[0]["train_seconds"],
             "seconds_per_volume": float(np.mean([r["seconds_per_volume"] for r in members]))}
            for (method, count, seed, concept), members in groups.items()]


def mean_sd(values: Sequence[float]) -> str:
    """mean ± sample sd, 3 decimals (sd 0 for a single value)."""
    sd = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return f"{np.mean(values):.3f} ± {sd:.3f}"


def overall_by_seed(rows: Sequence[Mapping], method: str, count: int) -> list[float]:
    """Per seed, the mean Dice over concepts of one method at one labelled count (seeds in increasing order)."""
    seeds = sorted({r["seed"] for r in rows if r["method"] == method and r["labelled"] == count})
    return [float(np.mean([r["dice"] for r in rows if (r["method"], r["labelled"], r["seed"]) == (method, count, s)]))
            for s in seeds]


def efficiency_table(rows: Sequence[Mapping]) -> str:
    """Markdown: per method, mean Dice over concepts (mean ± sd over seeds) at each labelled count."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    counts = sorted({r["labelled"] for r in rows})
    lines = ["| method | " + " | ".join(f"{c} labelled" for c in counts) + " |", "|---|" + "---|" * len(counts)]
    for method in methods:
        lines.append(f"| {method} | " + " | ".join(mean_sd(overall_by_seed(rows, method, c)) for c in counts) + " |")
    return "\n".join(lines)


def paired_table(rows: Sequence[Mapping], first: str, second: str, count: int) -> str:
    """Markdown at one labelled count: per concept and overall, every method's Dice (mean ± sd over seeds) and the
    paired per-seed difference `first − second`."""
    rows = [r for r in rows if r["labelled"] == count]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    concepts = list(dict.fromkeys(r["concept"] for r in rows))
    seeds = sorted({r["seed"] for r in rows})
    dice = {(r["method"], r["seed"], r["concept"]): r["dice"] for r in rows}
    for method in methods:
        for seed in seeds:
            dice[(method, seed, "overall")] = float(np.mean([dice[(method, seed, c)] for c in concepts]))
    header = ["organ", *methods, f"{first} − {second}"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for concept in [*concepts, "overall"]:
        cells = [mean_sd([dice[(m, s, concept)] for s in seeds]) for m in methods]
        difference = mean_sd([dice[(first, s, concept)] - dice[(second, s, concept)] for s in seeds])
        lines.append("| " + " | ".join([concept, *cells, difference]) + " |")
    return "\n".join(lines)
