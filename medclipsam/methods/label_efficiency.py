"""Label efficiency: methods trained on shrinking labelled subsets of one pool of training cases (the rest of the
pool unlabelled, for semi-supervised methods), scored by Dice on held-out cases, over training seeds.

Every method gets the same labelled slices, the same budget (steps, slices per step) and the same seeds; the seeds
vary only training (weights, slice order, noise), the split of the pool is fixed by `data_seed` and nested (the cases
labelled at 1 are among those labelled at 2). One seed of it is the method comparison (`methods.comparison`); this
module adds the case pool both share, the repetition over seeds and the tables. Used by
`benchmarks/mean_teacher_vs_supervised.py` and `notebooks/04_semi_supervised.ipynb`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from medclipsam.data.concepts import ConceptCard
from medclipsam.data.datalists import split_cases
from medclipsam.data.slices import load_case, volume_slices
from medclipsam.methods.base import TrainBudget
from medclipsam.training.pipeline import training_items


@dataclass
class CasePool:
    """A pool of training cases loaded once: labelled slice items and unlabelled images per case, held-out cases."""

    cases: list[dict]  # datalist entries of the pool, for the labelled / unlabelled split
    items: dict[str, list[dict]]  # case id -> labelled slice items (every concept of the card listed)
    images: dict[str, list[dict]]  # case id -> its slices as unlabelled items (image, case id, slice index)
    held_out: list[dict]  # loaded held-out cases (image and label)

    def split(self, n_labelled: int, seed: int) -> tuple[list[dict], list[dict]]:
        """(labelled slice items of `n_labelled` cases, unlabelled items of the rest of the pool), by `seed`."""
        labelled, unlabelled = split_cases(self.cases, n_labelled, seed=seed)
        return ([item for entry in labelled for item in self.items[entry["case_id"]]],
                [item for entry in unlabelled for item in self.images[entry["case_id"]]])


def load_pool(training: Sequence[Mapping], held_out: Sequence[Mapping], card: ConceptCard, image_size: int,
              seed: int = 0, modality: str = "CT", window: str | None = "abdomen") -> CasePool:
    """Slice every training case at `image_size` (labelled items and unlabelled images) and load the held-out ones."""
    items, images = {}, {}
    for entry in training:
        case_id = entry["case_id"]
        items[case_id] = training_items([entry], card, size=image_size, seed=seed, modality=modality, window=window)
        images[case_id] = [{"image": image, "case_id": case_id, "slice_index": index}
                           for index, image, _ in volume_slices(load_case(entry, modality, window)["image"],
                                                                size=image_size)]
    return CasePool([dict(entry) for entry in training], items, images,
                    [load_case(entry, modality, window) for entry in held_out])


def run_label_efficiency(pool: CasePool, card: ConceptCard, methods: Mapping[str, Mapping[str, Any]],
                         labelled_counts: Sequence[int], seeds: Sequence[int], steps: int, slices_per_step: int,
                         data_seed: int = 0, device: str | torch.device = "cpu",
                         progress: Callable[[str], None] | None = None) -> list[dict]:
    """The comparison (`medclipsam.methods.comparison.run_comparison`, text setting) at every training seed; one
    row per (method, labelled count, seed, concept) with the Dice averaged over the held-out cases, the trainable
    parameters and the seconds of training and per volume."""
    from medclipsam.methods.comparison import run_comparison  # it imports CasePool from here

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
