"""The comparison of segmentation methods at equal labels: every chosen method trained on the same labelled subset
of one pool of cases (the rest of the pool unlabelled, for semi-supervised methods) with the same budget and seed,
then evaluated by the same code (`evaluate_method`) on the same held-out cases in every setting it supports.

Output: per-case rows, a summary per (method, setting, labelled count, organ) with Dice and HD95 (mean ± sd over
cases), trainable parameters, training seconds and seconds per volume, written as CSV + Markdown
(`write_comparison`). Used by `medclipsam compare`, `benchmarks/compare_methods.py` and
`notebooks/02_compare_methods.ipynb`. A method whose weights or package are missing (e.g. SAM 3) is not run; the
reason is kept and reported, nothing stands in for it.

Resumable: with a `resume_dir`, each method's rows are saved (`partial/NAME_COUNTlabelled.json`, atomically) as soon
as it is evaluated, with a fingerprint of what made them (options, budget, settings, split, cases); a re-run with the
same fingerprint reuses them instead of training again, so an interrupted hours-long comparison loses one method.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from medclipsam import __version__
from medclipsam.atomic import atomic_write
from medclipsam.data.concepts import ConceptCard
from medclipsam.errors import InputError, OutputExistsError, WeightsError
from medclipsam.eval.metrics import _mean_sd, write_table
from medclipsam.methods.base import SETTINGS, SegmentationMethod, TrainBudget, available_methods, build_method, \
    segment_case
from medclipsam.methods.evaluation import evaluate_method
from medclipsam.methods.label_efficiency import CasePool
from medclipsam.training.trainer import seed_everything

SAM_METHODS = ("sam_lora", "two_stage", "esc_net")  # take `sam` / `sam_checkpoint` options
OPTIONAL_METHODS = ("sam3",)  # run only when named: they need a package and weights the user supplies
FILES = {"summary": "comparison.csv", "cases": "comparison_cases.csv", "markdown": "comparison.md"}
PARTIAL_DIR = "partial"
PROTOCOL = 2  # how rows are made, in saved rows' fingerprints; 2: initial weights drawn from the budget's seed


@dataclass
class ComparisonResult:
    """Per-case rows (one per method, setting, labelled count, case and organ), methods not run with the reason,
    and (when asked to keep them) the trained methods by (name, labelled count)."""

    rows: list[dict] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    methods: dict[tuple[str, int], SegmentationMethod] = field(default_factory=dict)


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


def pool_image_size(pool: CasePool) -> int:
    """The slice size S of a pool's labelled items."""
    for items in pool.items.values():
        if items:
            return int(items[0]["image"].shape[-1])
    raise InputError(None, "the pool of cases has no labelled slices", "Load at least one labelled training case")


def train_method(name: str, options: Mapping[str, Any], pool: CasePool, card: ConceptCard, n_labelled: int | float,
                 budget: TrainBudget, data_seed: int = 0, device: str | torch.device = "cpu",
                 progress: Callable[[str], None] | None = None) -> tuple[SegmentationMethod, list[dict], float]:
    """Build a method by name over the card's concepts and fit it on `n_labelled` cases of the pool (split by
    `data_seed`; the others unlabelled) within `budget`: (method, per-step history, training seconds). Initial
    weights are drawn from `budget.seed`, so a result does not depend on what ran before it in the process."""
    labelled, unlabelled = pool.split(n_labelled, data_seed)
    seed_everything(budget.seed)
    try:
        method = build_method(name, card.names(), **options)
    except (TypeError, ValueError) as error:
        raise InputError(None, f"cannot build method {name!r} with options {dict(options)} ({error})",
                         "Check the option names and values in the method's docstring") from error
    size = pool_image_size(pool)
    if method.image_size != size:
        raise InputError(None, f"{name} works on {method.image_size}-pixel slices but the cases were sliced at {size}",
                         f"Slice the cases at {method.image_size}, or give {name} options for {size}-pixel slices")
    method.to(device)
    start = time.perf_counter()
    try:
        history = method.fit(labelled, unlabelled, budget, progress)
    except ValueError as error:
        raise InputError(None, f"{name} cannot train on {len(labelled)} labelled and {len(unlabelled)} unlabelled "
                               f"slices ({error})", "Change the labelled count or the pool of cases") from error
    return method, history, time.perf_counter() - start


def run_fingerprint(name: str, options: Mapping[str, Any], count: int, budget: TrainBudget, settings: Sequence[str],
                    data_seed: int, pool: CasePool) -> dict[str, Any]:
    """What one method's rows depend on, as JSON-ready values: equal fingerprints, interchangeable rows."""
    return json.loads(json.dumps({
        "medclipsam_version": __version__, "protocol": PROTOCOL, "method": name, "options": dict(options),
        "labelled": count, "budget": asdict(budget), "settings": list(settings), "data_seed": data_seed,
        "image_size": pool_image_size(pool),
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
                   resume_dir: str | Path | None = None,
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
    result = ComparisonResult()
    for count in labelled_counts:
        for name, options in methods.items():
            if name in result.skipped:
                continue
            fingerprint = run_fingerprint(name, options, count, budget, settings, data_seed, pool)
            partial = partial_path(resume_dir, name, count) if resume_dir is not None else None
            reused = saved_rows(partial, fingerprint) if partial is not None else None
            if reused is not None:
                result.rows += reused
                if progress:
                    progress(f"{count} labelled, {name}: reusing the rows saved in {partial}")
                continue
            try:
                method, _, train_seconds = train_method(name, options, pool, card, count, budget, data_seed, device,
                                                        progress)
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


def summary_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict]:
    """One row per (method, setting, labelled count, organ) and a "mean" organ (the mean over organs per case):
    Dice and HD95 mean ± sd over cases, trainable parameters, training seconds and mean seconds per volume."""
    keys = list(dict.fromkeys((r["method"], r["setting"], r["labelled"]) for r in rows))
    summary = []
    for method, setting, labelled in keys:
        group = [r for r in rows if (r["method"], r["setting"], r["labelled"]) == (method, setting, labelled)]
        concepts = list(dict.fromkeys(r["concept"] for r in group))
        cases = list(dict.fromkeys(r["case_id"] for r in group))
        per_concept = {c: [r for r in group if r["concept"] == c] for c in concepts}
        per_concept["mean"] = [{metric: float(np.mean([r[metric] for r in group if r["case_id"] == case]))
                                for metric in ("dice", "hd95")} for case in cases]
        for concept, members in per_concept.items():
            dice, dice_sd = _mean_sd([m["dice"] for m in members])
            hd95, hd95_sd = _mean_sd([m["hd95"] for m in members])
            summary.append({"method": method, "setting": setting, "labelled": labelled, "concept": concept,
                            "dice_mean": dice, "dice_sd": dice_sd, "hd95_mean": hd95, "hd95_sd": hd95_sd,
                            "cases": len(members), "trainable_parameters": group[0]["trainable_parameters"],
                            "train_seconds": group[0]["train_seconds"],
                            "seconds_per_volume": float(np.mean([r["seconds_per_volume"] for r in group]))})
    return summary


def _parameters(count: int) -> str:
    return f"{count / 1e6:.2f}M" if count >= 1e5 else str(count)


def markdown_tables(summary: Sequence[Mapping[str, Any]], skipped: Mapping[str, str] | None = None) -> str:
    """Markdown: per labelled count, a Dice table and an HD95 table (rows: method and setting; columns: organs,
    their mean, trainable parameters, seconds per volume); then the methods not run and why."""
    lines: list[str] = []
    for labelled in sorted({r["labelled"] for r in summary}):
        rows = [r for r in summary if r["labelled"] == labelled]
        concepts = [c for c in dict.fromkeys(r["concept"] for r in rows) if c != "mean"] + ["mean"]
        entries = list(dict.fromkeys((r["method"], r["setting"]) for r in rows))
        cell = {(r["method"], r["setting"], r["concept"]): r for r in rows}
        for metric, title, digits in (("dice", "Dice", 3), ("hd95", "HD95 (mm)", 1)):
            lines += [f"### {title}, {labelled} labelled volume{'s' if labelled != 1 else ''} "
                      "(mean ± sd over held-out cases)", "",
                      "| method | setting | " + " | ".join(concepts) + " | trainable params | s / volume |",
                      "|---|---|" + "---|" * (len(concepts) + 2)]
            for method, setting in entries:
                first = cell[(method, setting, concepts[-1])]
                values = [cell.get((method, setting, c)) for c in concepts]
                text = [f"{v[metric + '_mean']:.{digits}f} ± {v[metric + '_sd']:.{digits}f}" if v else ""
                        for v in values]
                lines.append(f"| {method} | {setting} | " + " | ".join(text) +
                             f" | {_parameters(first['trainable_parameters'])} | {first['seconds_per_volume']:.2f} |")
            lines.append("")
    if skipped:
        lines += ["### Not run", ""] + [f"- **{name}**: {reason}" for name, reason in skipped.items()] + [""]
    return "\n".join(lines)


def cost_table(summary: Sequence[Mapping[str, Any]]) -> str:
    """Markdown: per method and labelled count, trainable parameters, training seconds and seconds per volume (per
    setting, as inference differs between them)."""
    rows = [r for r in summary if r["concept"] == "mean"]
    lines = ["| method | labelled | setting | trainable params | training (s) | s / volume |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['labelled']} | {r['setting']} | {_parameters(r['trainable_parameters'])} | "
              f"{r['train_seconds']:.1f} | {r['seconds_per_volume']:.2f} |"
              for r in sorted(rows, key=lambda r: (r["method"], r["labelled"], r["setting"]))]
    return "\n".join(lines)


def check_output_folder(folder: str | Path, overwrite: bool = False) -> dict[str, Path]:
    """The result files' paths in `folder`; OutputExistsError when some exist and `overwrite` is off (checked
    before a comparison starts, not after hours of training)."""
    folder = Path(folder)
    paths = {key: folder / name for key, name in FILES.items()}
    existing = [str(p) for p in paths.values() if p.exists()]
    if existing and not overwrite:
        raise OutputExistsError(folder, f"comparison results are already there ({', '.join(existing)}); pass "
                                        "overwrite=True (--overwrite) or choose another folder")
    return paths


def write_comparison(result: ComparisonResult, folder: str | Path, overwrite: bool = False) -> dict[str, Path]:
    """Write the summary (`comparison.csv`), the per-case rows (`comparison_cases.csv`) and the Markdown tables
    (`comparison.md`) into `folder`, each atomically; refuses to replace them unless `overwrite`."""
    folder = Path(folder)
    paths = check_output_folder(folder, overwrite)
    if not result.rows:
        raise InputError(folder, "no method was evaluated, so there is no table to write",
                         "Check the methods not run: " + "; ".join(result.skipped.values()) if result.skipped
                         else "Choose at least one method")
    summary = summary_rows(result.rows)
    folder.mkdir(parents=True, exist_ok=True)
    write_table(summary, paths["summary"], fmt="csv", overwrite=True)
    write_table(result.rows, paths["cases"], fmt="csv", overwrite=True)
    text = markdown_tables(summary, result.skipped)
    atomic_write(paths["markdown"], lambda temp: Path(temp).write_text(text, encoding="utf-8"))
    return paths


def curve_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Rows for `medclipsam.eval.plots.dice_vs_labelled_figure`: one line per method and setting."""
    return [{**row, "method": f"{row['method']} ({row['setting']})"} for row in rows]


def example_segmentations(result: ComparisonResult, case: Mapping[str, Any], card: ConceptCard, labelled: int,
                          settings: Sequence[str] = ("text",)) -> dict[str, torch.Tensor]:
    """Label volumes of one loaded case by every kept method trained at `labelled` count, in each of `settings` it
    supports, titled "method (setting)" (`run_comparison(..., keep_methods=True)`), for side-by-side overlays."""
    panels = {}
    for (name, count), method in result.methods.items():
        if count == labelled:
            for setting in [s for s in settings if s in method.settings]:
                panels[f"{name} ({setting})"] = segment_case(method, case, card, setting=setting)
    return panels
