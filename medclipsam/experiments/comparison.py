"""The comparison of segmentation methods at equal labels: every chosen method trained on the same labelled subset
of one pool of cases (the rest of the pool unlabelled, for semi-supervised methods) with the same budget, seed and
augmentation, then evaluated by the same code (`medclipsam.eval.evaluate`, the predictor `segment` runs) on the same
held-out cases in every setting it supports.

Output: per-case rows and their summary (`comparison_tables`). Used by `medclipsam compare`,
`benchmarks/compare_methods.py` and `notebooks/02_compare_methods.ipynb`. A method whose weights or package are
missing (e.g. SAM 3) is not run; the reason is kept and reported, nothing stands in for it.

Resumable: with a `resume_dir`, each method's rows are saved (`partial/NAME_COUNTlabelled.json`, atomically) as soon
as it is evaluated, with a fingerprint of what made them (options, budget, settings, split, cases, frame,
augmentation); a re-run with the same fingerprint reuses them instead of training again.
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from medclipsam import __version__
from medclipsam.atomic import atomic_write
from medclipsam.data.augment import AugmentSettings
from medclipsam.data.concepts import ConceptCard
from medclipsam.data.frame import FrameSettings
from medclipsam.errors import InputError, WeightsError
from medclipsam.eval.evaluate import SETTINGS, evaluate_method, segment_case
from medclipsam.experiments.setup import experiment_cases
from medclipsam.inference.predictor import Predictor
from medclipsam.models.factory import available_methods
from medclipsam.training.loop import TrainBudget
from medclipsam.training.pipeline import CasePool, fit_method, load_pool

SAM_METHODS = ("sam_lora", "two_stage", "esc_net")  # take `sam` / `sam_checkpoint` options
OPTIONAL_METHODS = ("sam3",)  # run only when named: they need a package and weights the user supplies
FILES = {"summary": "comparison.csv", "cases": "comparison_cases.csv", "markdown": "comparison.md"}
PARTIAL_DIR = "partial"
PROTOCOL = 3  # how rows are made, in saved rows' fingerprints; 2: initial weights drawn from the budget's seed;
# 3: the physical frame, augmentation, evaluation through the predictor with 3D boxes


@dataclass
class ComparisonResult:
    """Per-case rows (one per method, setting, labelled count, case and organ), methods not run with the reason,
    and (when asked to keep them) the trained methods by (name, labelled count)."""

    rows: list[dict] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    methods: dict[tuple[str, int], nn.Module] = field(default_factory=dict)


def default_methods() -> list[str]:
    """Every registered method except the optional ones (SAM 3 runs only when named, with its checkpoint)."""
    return [name for name in available_methods() if name not in OPTIONAL_METHODS]


def default_options(name: str, image_size: int, sam: str = "litemedsam", sam_checkpoint: str | None = None
                    ) -> dict[str, Any]:
    """Build options that make method `name` work on slices of `image_size` with the given SAM backbone."""
    if name == "clip_guided_sam":
        return {"model_options": {"sam": sam, "sam_checkpoint": sam_checkpoint}}
    if name in SAM_METHODS:
        return {"sam": sam, "sam_checkpoint": sam_checkpoint}
    return {"image_size": image_size}


def run_fingerprint(name: str, options: Mapping[str, Any], count: int, budget: TrainBudget, settings: Sequence[str],
                    data_seed: int, pool: CasePool, augment: AugmentSettings) -> dict[str, Any]:
    """What one method's rows depend on, as JSON-ready values: equal fingerprints, interchangeable rows."""
    return json.loads(json.dumps({
        "medclipsam_version": __version__, "protocol": PROTOCOL, "method": name, "options": dict(options),
        "labelled": count, "budget": asdict(budget), "settings": list(settings), "data_seed": data_seed,
        "frame": pool.frame.to_dict(), "augment": augment.to_dict(),
        "training_cases": [entry["case_id"] for entry in pool.cases],
        "held_out_cases": [str(case["case_id"]) for case in pool.held_out]}, default=str))


def partial_path(resume_dir: str | Path, name: str, count: int) -> Path:
    """Where the rows of method `name` at `count` labelled volumes are kept during a resumable comparison."""
    return Path(resume_dir) / PARTIAL_DIR / f"{name}_{count}labelled.json"


def saved_rows(path: Path, fingerprint: Mapping[str, Any]) -> list[dict] | None:
    """The rows saved at `path` when they were made with `fingerprint`; None when absent, unreadable or stale."""
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(saved, dict) or saved.get("fingerprint") != fingerprint:
        return None
    return saved.get("rows")


def save_rows(path: Path, fingerprint: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> None:
    """Keep one method's rows with their fingerprint, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"fingerprint": fingerprint, "rows": list(rows)}, default=float)
    atomic_write(path, lambda temp: Path(temp).write_text(text, encoding="utf-8"))


def run_comparison(pool: CasePool, card: ConceptCard, methods: Mapping[str, Mapping[str, Any]],
                   labelled_counts: Sequence[int], budget: TrainBudget, settings: Sequence[str] = SETTINGS,
                   data_seed: int = 0, device: str | torch.device = "cpu", keep_methods: bool = False,
                   resume_dir: str | Path | None = None, augment: AugmentSettings | None = None,
                   progress: Callable[[str], None] | None = None) -> ComparisonResult:
    """Train every method (name -> build options) at every labelled count and evaluate it on the pool's held-out
    cases in each of `settings` it supports. A method that raises WeightsError (missing package or weights) is
    skipped and the reason recorded. With `resume_dir`, rows saved there by an earlier run with the same fingerprint
    are reused (those methods are not retrained, so not kept) and new rows are saved as each method finishes."""
    if not pool.held_out:
        raise InputError(None, "no held-out cases to evaluate on", "Keep at least one labelled case out of training")
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        raise InputError(None, f"unknown settings {unknown}", f"Choose among {list(SETTINGS)}")
    augment = augment or AugmentSettings()
    result = ComparisonResult()
    for count in labelled_counts:
        for name, options in methods.items():
            if name in result.skipped:
                continue
            fingerprint = run_fingerprint(name, options, count, budget, settings, data_seed, pool, augment)
            partial = partial_path(resume_dir, name, count) if resume_dir is not None else None
            reused = saved_rows(partial, fingerprint) if partial is not None else None
            if reused is not None:
                result.rows += reused
                if progress:
                    progress(f"{count} labelled, {name}: reusing the rows saved in {partial}")
                continue
            try:
                method, _, train_seconds = fit_method(name, options, pool, card, count, budget, data_seed, device,
                                                      augment, progress)
            except WeightsError as error:
                result.skipped[name] = str(error)
                if progress:
                    progress(f"{name}: not run ({error})")
                continue
            method_rows = []
            for setting in [s for s in settings if s in method.settings]:
                rows = evaluate_method(method, pool.held_out, card, setting=setting)
                method_rows += [{**row, "labelled": count, "seed": budget.seed,
                                 "trainable_parameters": method.trainable_parameters(),
                                 "train_seconds": round(train_seconds, 2)} for row in rows]
                if progress:
                    dice = np.mean([r["dice"] for r in rows])
                    progress(f"{count} labelled, {name} ({setting}): mean Dice {dice:.3f}, "
                             f"trained in {train_seconds:.0f} s")
            result.rows += method_rows
            if partial is not None:
                save_rows(partial, fingerprint, method_rows)
            if keep_methods:
                result.methods[(name, count)] = method.cpu()
    return result


def example_segmentations(result: ComparisonResult, case: Mapping[str, Any], card: ConceptCard, labelled: int,
                          settings: Sequence[str] = ("text",)) -> dict[str, torch.Tensor]:
    """Label volumes of one loaded case by every kept method trained at `labelled` count, in each of `settings` it
    supports, titled "method (setting)" (`run_comparison(..., keep_methods=True)`), for side-by-side overlays."""
    panels = {}
    for (name, count), method in result.methods.items():
        if count == labelled:
            predictor = Predictor(method, device=method.device)
            for setting in [s for s in settings if s in method.settings]:
                panels[f"{name} ({setting})"] = torch.from_numpy(segment_case(predictor, case, card, setting))
    return panels


def compare_on_datalist(data_dir: str | Path | None, card: ConceptCard, methods: Mapping[str, Mapping[str, Any]],
                        labelled_counts: Sequence[int], budget: TrainBudget, frame: FrameSettings,
                        n_training: int | None = 6, n_held_out: int = 2, settings: Sequence[str] = SETTINGS,
                        phantom_shape: Sequence[int] = (128, 128, 32), data_seed: int = 0,
                        device: str | torch.device = "cpu", keep_methods: bool = False,
                        resume_dir: str | Path | None = None, augment: AugmentSettings | None = None,
                        progress: Callable[[str], None] | None = None) -> tuple[ComparisonResult, CasePool]:
    """Load the cases (a dataset folder or `dataset.json`, or CT phantoms written to a temporary folder when
    `data_dir` is None; see `experiment_cases`), frame them and run the comparison (resumable from `resume_dir`)."""
    with tempfile.TemporaryDirectory() as folder:
        training, held_out = experiment_cases(data_dir, n_training, n_held_out, folder, seed=data_seed,
                                              shape=phantom_shape)
        pool = load_pool(training, held_out, card, frame, seed=data_seed)
    result = run_comparison(pool, card, methods, labelled_counts, budget, settings, data_seed=data_seed,
                            device=device, keep_methods=keep_methods, resume_dir=resume_dir, augment=augment,
                            progress=progress)
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
