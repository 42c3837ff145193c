"""Datalist in, trained model out, for every method: the one road `medclipsam train`, the comparison and the
scripts take (the bundle's engines drive the same fit).

Cases are loaded once into a pool (labelled slice items and unlabelled slices per case, in the method's frame);
`labelled` of them stay labelled and the rest unlabelled (for semi-supervised methods); labelled slices get the
few-label augmentation every method gets alike; the method fits within the budget and is saved in the common
checkpoint format.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from monai.data import MetaTensor
from monai.utils import set_determinism
from torch import nn

from medclipsam.data.augment import AugmentSettings, augment_items
from medclipsam.data.concepts import ConceptCard, load_card
from medclipsam.data.datalists import split_cases
from medclipsam.data.frame import FrameSettings
from medclipsam.data.slices import frame_case, load_case, slice_items, unlabelled_items
from medclipsam.errors import InputError
from medclipsam.eval.metrics import write_table
from medclipsam.models.checkpoints import is_checkpoint, save_checkpoint
from medclipsam.models.factory import build_method, method_builder
from medclipsam.training.loop import TrainBudget

MODEL_DIR = "model"


@dataclass
class CasePool:
    """Training cases loaded once (labelled slice items and unlabelled slices per case) and held-out cases."""

    cases: list[dict]  # datalist entries of the pool, for the labelled / unlabelled split
    items: dict[str, list[dict]]  # case id -> labelled slice items (every concept of the card listed)
    images: dict[str, list[dict]]  # case id -> its slices as unlabelled items (image, case id, slice index)
    held_out: list[dict]  # loaded held-out cases (RAS image and label)
    frame: FrameSettings

    def split(self, n_labelled: int | float, seed: int) -> tuple[list[dict], list[dict]]:
        """(labelled slice items of `n_labelled` cases, unlabelled items of the rest of the pool), by `seed`."""
        labelled, unlabelled = split_cases(self.cases, n_labelled, seed=seed)
        return ([item for entry in labelled for item in self.items[entry["case_id"]]],
                [item for entry in unlabelled for item in self.images[entry["case_id"]]])


def load_labelled(entry: Mapping, card: ConceptCard) -> dict:
    """`load_case`, with labels read through `card`: an entry naming its own concept card ("card": a name or path,
    e.g. one real scan labelled by TotalSegmentator among phantoms) has its label ids mapped onto `card`'s by
    concept name; structures `card` does not name become background."""
    case = load_case(entry)
    if entry.get("card") and case.get("label") is not None:
        mapping = card.id_map_from(load_card(entry["card"]))
        lookup = torch.zeros(max(mapping) + 1, dtype=torch.int64)
        for source, target in mapping.items():
            lookup[source] = target
        label = case["label"]
        unknown = sorted(set(torch.unique(label.as_tensor()).tolist()) - set(mapping) - {0})
        if unknown:
            raise InputError(case["label_path"], f"label values {unknown} are not in its card {entry['card']!r}",
                             "Use the card that belongs to this label file")
        case["label"] = MetaTensor(lookup[label.as_tensor().long()], meta=label.meta)
    return case


def load_pool(training: Sequence[Mapping], held_out: Sequence[Mapping], card: ConceptCard, frame: FrameSettings,
              seed: int = 0, slice_step: int = 1, empty_ratio: float = 0.1,
              progress: Callable[[str], None] | None = None) -> CasePool:
    """Frame every training case (labelled items with every card concept listed, absent ones empty, so a model learns
    what is not there as well as what is; and unlabelled slices) and load the held-out cases (entries may name their
    own card: `load_labelled`)."""
    items, images, entries = {}, {}, []
    for number, entry in enumerate(training, 1):
        case = load_labelled(entry, card)
        framed = frame_case(case, frame)
        entries.append({**dict(entry), "case_id": framed.case_id})
        items[framed.case_id] = slice_items(framed, card, empty_ratio=empty_ratio,
                                            absent_per_slice=len(card.concepts), seed=seed, slice_step=slice_step)
        images[framed.case_id] = unlabelled_items(framed, slice_step)
        if progress:
            progress(f"framed case {number}/{len(training)}: {framed.case_id} ({len(items[framed.case_id])} slices)")
    return CasePool(entries, items, images, [load_labelled(entry, card) for entry in held_out], frame)


def training_split(pool: CasePool, n_labelled: int | float, seed: int, augment: AugmentSettings | None = None
                   ) -> tuple[list[dict], list[dict]]:
    """(labelled items with their augmented views, unlabelled items) of `n_labelled` cases of the pool, by `seed`."""
    labelled, unlabelled = pool.split(n_labelled, seed)
    return augment_items(labelled, augment or AugmentSettings(), seed=seed), unlabelled


def fit_method(name: str, options: Mapping[str, Any], pool: CasePool, card: ConceptCard, n_labelled: int | float,
               budget: TrainBudget, data_seed: int = 0, device: str | torch.device = "cpu",
               augment: AugmentSettings | None = None, progress: Callable[[str], None] | None = None,
               work_dir: Path | None = None) -> tuple[nn.Module, list[dict], float]:
    """Build method `name` over the card's concepts and fit it on `n_labelled` cases of the pool (split by
    `data_seed`; the others unlabelled) within `budget`: (method, per-step history, training seconds). Initial
    weights are drawn from `budget.seed`, so a result does not depend on what ran before it in the process."""
    labelled, unlabelled = pool.split(n_labelled, data_seed)
    labelled = augment_items(labelled, augment or AugmentSettings(), seed=budget.seed)
    set_determinism(seed=budget.seed)
    try:
        method = build_method(name, card.names(), **options)
    except (TypeError, ValueError) as error:
        raise InputError(None, f"cannot build method {name!r} with options {dict(options)} ({error})",
                         "Check the option names and values in the method's docstring") from error
    if method.image_size != pool.frame.size:
        raise InputError(None, f"{name} works on {method.image_size}-pixel slices but the cases were framed at "
                               f"{pool.frame.size}", f"Frame the cases at {method.image_size} pixels, or give {name} "
                                                     f"options for {pool.frame.size}-pixel slices")
    method.frame = pool.frame
    method.to(device)
    start = time.perf_counter()
    try:
        history = method.fit(labelled, unlabelled, budget, progress, work_dir=work_dir)
    except ValueError as error:
        raise InputError(None, f"{name} cannot train on {len(labelled)} labelled and {len(unlabelled)} unlabelled "
                               f"slices ({error})", "Change the labelled count or the pool of cases") from error
    return method.eval(), history, time.perf_counter() - start


def train_on_datalist(name: str, options: Mapping[str, Any], cases: Sequence[Mapping], card: ConceptCard,
                      out_dir: str | Path, frame: FrameSettings, labelled: int | float | None = None,
                      budget: TrainBudget | None = None, augment: AugmentSettings | None = None,
                      slice_step: int = 1, empty_ratio: float = 0.1, device: str | torch.device = "cpu",
                      overwrite: bool = False, progress: Callable[[str], None] | None = None) -> Path:
    """Fit method `name` on `labelled` cases of the datalist (all when None; the rest unlabelled) and save it to
    `out_dir/model` (+ `out_dir/log.csv`, the per-step losses); returns the model folder. CLIP-Guided SAM keeps a
    resumable state in `out_dir` and checkpoints as it trains (methods with `resumable = True`): re-running the same
    command continues it."""
    budget = budget or TrainBudget()
    out = Path(out_dir)
    model_dir = out / MODEL_DIR
    resumable = bool(getattr(method_builder(name), "resumable", False))
    if is_checkpoint(model_dir) and not overwrite and not resumable:
        raise InputError(model_dir, "a trained model is already there", "Pass --overwrite or choose another --out")
    pool = load_pool(cases, [], card, frame, seed=budget.seed, slice_step=slice_step, empty_ratio=empty_ratio,
                     progress=progress)
    method, history, seconds = fit_method(name, options, pool, card, labelled or len(pool.cases), budget,
                                          data_seed=budget.seed, device=device, augment=augment, progress=progress,
                                          work_dir=out if resumable else None)
    extra = {"budget": dataclasses.asdict(budget), "labelled": labelled, "train_seconds": round(seconds, 2),
             "augment": (augment or AugmentSettings()).to_dict(), "cases": [e["case_id"] for e in pool.cases]}
    save_checkpoint(method, model_dir, name, card.names(), dict(options), method.frame, extra=extra,
                    overwrite=overwrite or resumable)
    if history and not resumable:
        write_table([{"step": i, **terms} for i, terms in enumerate(history, 1)], out / "log.csv", overwrite=True)
    return model_dir
