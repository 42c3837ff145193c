"""Datalist in, results out, for any registered method: what `medclipsam train|evaluate|compare --method` run.

Training slices the datalist's cases (`load_pool`), keeps `labelled` of them labelled and the rest unlabelled, fits
the method by `comparison.train_method` (the entry point the comparison uses too) and saves it
(`methods.checkpoints`). CLIP-Guided SAM keeps its own trainer and checkpoint format
(`medclipsam.training.pipeline`, `medclipsam.training.checkpoints`); `method_for_evaluation` loads either.
"""
from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from medclipsam.data.concepts import ConceptCard
from medclipsam.errors import InputError
from medclipsam.eval.experiment import experiment_cases
from medclipsam.eval.metrics import write_table
from medclipsam.methods.base import SegmentationMethod, TrainBudget, build_method
from medclipsam.methods.checkpoints import is_saved_method, load_method, read_method_config, save_method
from medclipsam.methods.comparison import ComparisonResult, default_options, run_comparison, train_method
from medclipsam.methods.label_efficiency import CasePool, load_pool

CLIP_GUIDED_SAM = "clip_guided_sam"


def every_nth_slice(pool: CasePool, step: int) -> CasePool:
    """The pool with every `step`-th slice of each case kept (labelled items and unlabelled images)."""
    if step < 1:
        raise InputError(None, f"slice step must be a positive int, got {step!r}", "Use 1 to keep every slice")
    return dataclasses.replace(pool, items={k: v[::step] for k, v in pool.items.items()},
                               images={k: v[::step] for k, v in pool.images.items()})


def train_on_datalist(name: str, options: Mapping[str, Any], cases: Sequence[Mapping], card: ConceptCard,
                      out_dir: str | Path, image_size: int, labelled: int | float | None = None,
                      budget: TrainBudget | None = None, slice_step: int = 1, modality: str = "CT",
                      window: str | None = "abdomen", device: str | torch.device = "cpu", overwrite: bool = False,
                      progress: Callable[[str], None] | None = None) -> Path:
    """Fit method `name` on `labelled` cases of the datalist (all when None; the rest unlabelled) and save it to
    `out_dir/model` (+ `out_dir/log.csv`, the per-step losses); returns the model folder."""
    budget = budget or TrainBudget()
    model_dir = Path(out_dir) / "model"
    if is_saved_method(model_dir) and not overwrite:
        raise InputError(model_dir, "a trained method is already there", "Pass --overwrite or choose another --out")
    pool = every_nth_slice(load_pool(cases, [], card, image_size, seed=budget.seed, modality=modality,
                                     window=window), slice_step)
    method, history, seconds = train_method(name, options, pool, card, labelled or len(pool.cases), budget,
                                            data_seed=budget.seed, device=device, progress=progress)
    save_method(method, model_dir, options, extra={"budget": dataclasses.asdict(budget), "labelled": labelled,
                                                   "train_seconds": round(seconds, 2)}, overwrite=overwrite)
    if history:
        write_table([{"step": i, **terms} for i, terms in enumerate(history, 1)], Path(out_dir) / "log.csv",
                    overwrite=True)
    return model_dir


def method_for_evaluation(name: str, model: str | Path | None, card: ConceptCard, options: Mapping[str, Any],
                          device: str | torch.device = "cpu") -> SegmentationMethod:
    """The method to evaluate: a CLIP-Guided SAM checkpoint (the shipped default model when `model` is None), a
    saved method (`train --method`), or, with no model folder, `name` built from `options` untrained (for zero-shot
    methods such as SAM 3)."""
    if name == CLIP_GUIDED_SAM:
        from medclipsam.methods.clip_guided_sam import CLIPGuidedSAMMethod
        from medclipsam.models.default import load_default_model
        from medclipsam.training.checkpoints import load_model

        if model is not None and is_saved_method(model):
            saved = read_method_config(model)["method"]
            raise InputError(model, f"this folder holds a saved {saved!r} method", f"Pass --method {saved}")
        loaded = load_default_model(device) if model is None else load_model(model, device=device)
        return CLIPGuidedSAMMethod(card.names(), model=loaded)
    if model is None:
        return build_method(name, card.names(), **options).to(device).eval()
    saved = read_method_config(model)["method"]
    if saved != name:
        raise InputError(model, f"this folder holds a saved {saved!r} method, not {name!r}", f"Pass --method {saved}")
    return load_method(model, device=device)


def compare_on_datalist(data_dir: str | Path | None, card: ConceptCard, methods: Mapping[str, Mapping[str, Any]],
                        labelled_counts: Sequence[int], budget: TrainBudget, image_size: int,
                        n_training: int | None = 6, n_held_out: int = 2, settings: Sequence[str] = ("text", "manual"),
                        phantom_shape: Sequence[int] = (128, 128, 32), data_seed: int = 0, modality: str = "CT",
                        window: str | None = "abdomen", device: str | torch.device = "cpu",
                        keep_methods: bool = False, resume_dir: str | Path | None = None,
                        progress: Callable[[str], None] | None = None) -> tuple[ComparisonResult, CasePool]:
    """Load the cases (a dataset folder or `dataset.json`, or CT phantoms written to a temporary folder when
    `data_dir` is None; see `experiment_cases`), slice them at `image_size` and run the comparison (resumable from
    `resume_dir`, see `run_comparison`)."""
    with tempfile.TemporaryDirectory() as folder:
        training, held_out = experiment_cases(data_dir, n_training, n_held_out, folder, seed=data_seed,
                                              shape=phantom_shape)
        pool = load_pool(training, held_out, card, image_size, seed=data_seed, modality=modality, window=window)
    result = run_comparison(pool, card, methods, labelled_counts, budget, settings, data_seed=data_seed,
                            device=device, keep_methods=keep_methods, resume_dir=resume_dir, progress=progress)
    return result, pool


def method_options(names: Sequence[str], image_size: int, sam: str = "litemedsam", sam_checkpoint: str | None = None,
                   overrides: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """Per method, `default_options` updated with the user's `overrides` (name -> options)."""
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise InputError(None, f"options given for methods that are not compared: {unknown}",
                         f"Compare them too, or drop their options (compared: {list(names)})")
    return {name: {**default_options(name, image_size, sam, sam_checkpoint), **overrides.get(name, {})}
            for name in names}
