"""`medclipsam segment`: segment organs by name in a batch of scans, loading the model once.

Each scan gets a folder OUT/<scan id>/ holding labels.nii.gz (a label map in the scan's exact geometry, values from
the concept card), report.json and report.csv (per concept: label value, voxels, volume in mL, axial slice range,
mean confidence) and, with --preview, preview.png. The folder is built under a hidden temporary name and renamed
into place in one step, so a scan's folder either is complete or does not exist. Re-running the same command skips
scans whose folder holds a report made with the same settings (resume); --overwrite redoes them. An unknown organ
name or a scan that cannot be used is reported in one line, the batch goes on, and a summary at the end (also
OUT/summary.json) lists every failure with its reason.

Exit codes (`medclipsam.inference.exit_codes`, also in --help): 0 every scan done and every prompt known; 1 some
scans or prompts failed, the others were done; 2 nothing could run (bad arguments, no known prompt, model missing or
unusable); 130 interrupted (re-run to finish the missing scans).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from tqdm.auto import tqdm
from transformers.utils import logging as transformers_logging

from medclipsam import __version__
from medclipsam.atomic import atomic_write, share_as_umask
from medclipsam.data.concepts import ConceptCard, load_card, normalise
from medclipsam.data.datalists import case_id_from_path
from medclipsam.data.intensity import intensity_transform
from medclipsam.data.io import SUPPORTED_FORMATS, is_scan_path, list_scans, load_scan, save_mask, to_ras
from medclipsam.errors import InputError, MedClipSamError, OutputExistsError, UnknownConceptError, WeightsError
from medclipsam.inference import exit_codes
from medclipsam.inference.manual import ManualPrompt, parse_manual_prompt, place_prompts, segment_manual
from medclipsam.inference.preview import overlay_png
from medclipsam.inference.report import axial_axis, voxel_volume_ml, volume_report, write_report
from medclipsam.inference.segment import segment_volume
from medclipsam.models.clip_guided_sam import CLIPGuidedSAM

MASK_FILE, REPORT_JSON, REPORT_CSV, PREVIEW_FILE, SUMMARY_FILE = (
    "labels.nii.gz", "report.json", "report.csv", "preview.png", "summary.json")
_PARTIAL, _REPLACED = ".partial-", ".replaced-"


@dataclass
class SegmentOptions:
    """What `medclipsam segment` was asked to do (the CLI arguments, parsed)."""

    inputs: Sequence[str]
    prompts: Sequence[str]
    out: str | Path
    model: str | None = None
    card: str = "phantom"
    boxes: Sequence[str] = ()
    points: Sequence[str] = ()
    coords: str = "voxel"
    modality: str = "CT"
    window: str = "abdomen"
    device: str = "auto"
    batch_size: int = 8
    cleanup: bool = True
    amp: bool = True
    preview: bool = False
    overwrite: bool = False
    quiet: bool = False


@dataclass
class Failure:
    """One input that failed: which (a scan path or a prompt) and why (one line)."""

    what: str
    reason: str


@dataclass
class BatchSummary:
    """Scan ids done and skipped (already done), the failures, and whether the run was cut short."""

    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[Failure] = field(default_factory=list)
    interrupted: bool = False
    model_failed: bool = False

    @property
    def exit_code(self) -> int:
        """The exit code for scripts (see `exit_codes`)."""
        if self.interrupted:
            return exit_codes.INTERRUPTED
        if self.model_failed:
            return exit_codes.NOTHING_RAN
        return exit_codes.FAILURES if self.failed else exit_codes.OK


@dataclass(frozen=True)
class ScanJob:
    """A scan to segment and the id naming its output folder."""

    path: Path
    scan_id: str


@dataclass
class _Plan:
    """Everything the per-scan step needs, resolved once for the batch."""

    options: SegmentOptions
    out: Path
    concepts: dict[str, int]  # canonical name -> card label id, in prompt order
    prompt_words: dict[str, str]  # canonical name -> the word typed
    manual: list[ManualPrompt]
    concept_of: dict[str, str]  # manual prompt word -> canonical name
    device: torch.device
    model_source: str
    _model: CLIPGuidedSAM | None = None

    def model(self) -> CLIPGuidedSAM:
        """The model, loaded on first use (a batch whose scans are all done never loads it)."""
        if self._model is None:
            from medclipsam.models.default import load_default_model
            from medclipsam.training.checkpoints import load_model

            source = self.options.model
            if _bars_off(self.options):
                transformers_logging.disable_progress_bar()
            self._model = load_model(source, device=self.device) if source else load_default_model(self.device)
        return self._model


def _bars_off(options: SegmentOptions) -> bool:
    """Progress bars only on a terminal (in a log file they would be noise) and never when quiet."""
    return options.quiet or not sys.stderr.isatty()


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(None, f"--device {name!r} is not a device name", "Use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(None, f"--device {name}: CUDA is not available on this machine", "Use --device cpu or auto")
    return device


def resolve_prompts(words: Sequence[str], card: ConceptCard) -> tuple[dict[str, int], dict[str, str], list[Failure]]:
    """Known prompts as canonical name -> label id and -> the word typed (first wins), and one failure per
    unknown word (its message lists close names)."""
    concepts: dict[str, int] = {}
    typed: dict[str, str] = {}
    failures = []
    for word in words:
        try:
            concept = card.resolve(word)
        except UnknownConceptError as error:
            failures.append(Failure(f"--prompt {word!r}", str(error)))
            continue
        concepts.setdefault(concept.name, concept.label_id)
        typed.setdefault(concept.name, word)
    return concepts, typed, failures


def _manual_concepts(manual: Sequence[ManualPrompt], words: Sequence[str], card: ConceptCard,
                     concepts: dict[str, int]) -> dict[str, str]:
    """Manual prompt word -> canonical concept (prompts of unknown --prompt words are dropped); checks that every
    known concept has exactly one box or some points, or that there is no manual prompt at all."""
    def known(word: str) -> str | None:
        try:
            return card.resolve(word).name
        except UnknownConceptError:
            return None

    unknown_words = {normalise(w) for w in words if known(w) is None}
    concept_of: dict[str, str] = {}
    for prompt in manual:
        concept = known(prompt.word)
        if concept not in concepts:
            if normalise(prompt.word) in unknown_words:
                continue  # its --prompt is already reported as unknown
            raise InputError(None, f"--{prompt.kind} {prompt.text!r} names {prompt.word!r}, which no --prompt asks for",
                             f"Name one of the prompts: {', '.join(repr(w) for w in words)}")
        concept_of[prompt.word] = concept
    kept = [p for p in manual if p.word in concept_of]
    for concept in concepts:
        kinds = [p.kind for p in kept if concept_of[p.word] == concept]
        if kept and not kinds:
            raise InputError(None, f"manual mode: --prompt {concept!r} has no --box or --point",
                             "Give a --box or --point for every --prompt, or none at all for text-only mode")
        if "box" in kinds and len(kinds) > 1:
            raise InputError(None, f"{concept!r} has {kinds.count('box')} --box and {kinds.count('point')} --point",
                             "Give one --box, or one or more --point, per organ")
    return concept_of


def find_scans(inputs: Sequence[str | Path], out: Path) -> tuple[list[ScanJob], list[Failure]]:
    """Scan jobs for the given files, DICOM folders and folders of scans (searched recursively, skipping `out`).

    A scan found in a folder is named by its path below that folder ('sub/ct.nii.gz' -> 'sub_ct'); two different
    scans that would share an output folder: the second fails."""
    out = out.resolve()
    jobs: dict[str, ScanJob] = {}
    seen: set[Path] = set()
    failures: list[Failure] = []
    for given in inputs:
        path = Path(given)
        if path.is_dir() and not is_scan_path(path):
            found = [p for p in list_scans(path) if out not in p.resolve().parents and p.resolve() != out]
            if not found:
                failures.append(Failure(str(path), f"holds no scans; expected {SUPPORTED_FORMATS}"))
            named = [(p, "_".join(p.relative_to(path).parent.parts + (case_id_from_path(p),))) for p in found]
        else:
            named = [(path, case_id_from_path(path.resolve()))]
        for scan, scan_id in named:
            if scan.resolve() in seen:
                continue
            seen.add(scan.resolve())
            if scan_id in jobs:
                failures.append(Failure(str(scan), f"its output folder {out / scan_id} is already taken by "
                                        f"{jobs[scan_id].path}; rename one of them or segment them in separate runs"))
                continue
            jobs[scan_id] = ScanJob(scan, scan_id)
    return list(jobs.values()), failures


def _settings(plan: _Plan, job: ScanJob) -> dict[str, Any]:
    """What a scan's result depends on; a later run with the same settings skips the scan."""
    options = plan.options
    return {
        "scan": str(job.path.resolve()), "model": plan.model_source, "card": options.card, "concepts": plan.concepts,
        "boxes": sorted(options.boxes), "points": sorted(options.points), "coords": options.coords,
        "modality": options.modality, "window": options.window, "cleanup": options.cleanup, "preview": options.preview,
    }


def _already_done(folder: Path, settings: dict[str, Any]) -> bool:
    """True if `folder` holds this scan's report made with `settings`; an error if it holds anything else."""
    fix = "pass --overwrite to redo it, or choose another --out"
    try:
        previous = json.loads((folder / REPORT_JSON).read_text(encoding="utf-8"))["settings"]
    except (OSError, ValueError, KeyError, TypeError):
        raise OutputExistsError(folder, f"exists but holds no readable {REPORT_JSON}; {fix}") from None
    if previous == settings:
        return True
    changed = sorted(key for key in settings.keys() | previous.keys() if settings.get(key) != previous.get(key))
    raise OutputExistsError(folder, f"holds a result made with other settings ({', '.join(changed)} differ); {fix}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, but another user's
        pass
    return True


def remove_stale_partials(out: Path) -> None:
    """Delete temporary scan folders left in `out` by runs that were killed (their process is gone)."""
    for entry in out.glob(".*-*"):
        prefix = next((p for p in (_PARTIAL, _REPLACED) if entry.name.startswith(p)), None)
        pid = entry.name[len(prefix):].split("-", 1)[0] if prefix else ""
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)) and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)


@contextlib.contextmanager
def _staging(out: Path) -> Iterator[Path]:
    """A hidden temporary folder in `out`, deleted unless the body renamed it into place."""
    folder = Path(tempfile.mkdtemp(prefix=f"{_PARTIAL}{os.getpid()}-", dir=out))
    try:
        yield folder
    finally:
        if folder.exists():
            shutil.rmtree(folder, ignore_errors=True)


def _publish(staging: Path, final: Path) -> None:
    """Rename a finished scan folder into place in one step (an older result is moved aside first, then deleted)."""
    share_as_umask([staging, *staging.iterdir()])
    old = None
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=f"{_REPLACED}{os.getpid()}-", dir=final.parent))
        os.replace(final, old / final.name)
    os.replace(staging, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _segment(plan: _Plan, job: ScanJob, scan: MetaTensor, volume: MetaTensor,
             progress: Callable[[int, int], None]) -> tuple[np.ndarray, dict[str, float]]:
    """RAS label map with card label ids, and confidence per concept."""
    options, names = plan.options, list(plan.concepts)
    model = plan.model()
    amp = torch.autocast(plan.device.type, dtype=torch.float16, enabled=options.amp and plan.device.type == "cuda")
    with amp:
        if plan.manual:
            prompts = place_prompts(plan.manual, plan.concept_of, options.coords, np.asarray(scan.affine),
                                    np.asarray(volume.affine), volume.shape[1:], job.path)
            found, confidence = segment_manual(model, volume, names, prompts, batch_size=options.batch_size,
                                               cleanup=options.cleanup, progress=progress)
        else:
            result = segment_volume(model, volume, names, batch_size=options.batch_size, progress=progress,
                                    cleanup=options.cleanup)
            found, confidence = result.labels.numpy(), result.confidence
    labels = np.zeros(found.shape, dtype=np.min_scalar_type(max(plan.concepts.values())))
    for position, label_id in enumerate(plan.concepts.values(), start=1):
        labels[found == position] = label_id
    return labels, confidence


def _process(plan: _Plan, job: ScanJob, progress: Callable[[int, int], None]) -> tuple[str, Path]:
    """Segment one scan and publish its folder; ("skipped", folder) if it was already done with these settings."""
    options = plan.options
    final = plan.out / job.scan_id
    settings = _settings(plan, job)
    if final.exists() and not options.overwrite and _already_done(final, settings):
        return "skipped", final
    scan = load_scan(job.path)
    volume = intensity_transform(options.modality, options.window)(to_ras(scan))
    labels, confidence = _segment(plan, job, scan, volume, progress)
    with _staging(plan.out) as staging:
        written = nib.load(save_mask(MetaTensor(torch.from_numpy(labels)[None], affine=volume.affine), like=scan,
                                     path=staging / MASK_FILE))
        rows = volume_report(np.asarray(written.dataobj), written.affine, plan.concepts, confidence, plan.prompt_words)
        report = {
            "scan": str(job.path), "labels": MASK_FILE, "shape": list(written.shape),
            "orientation": "".join(nib.orientations.aff2axcodes(written.affine)),
            "voxel_volume_ml": round(voxel_volume_ml(written.affine), 9), "slice_axis": axial_axis(written.affine),
            "affine": written.affine.tolist(),
            "mode": "manual" if plan.manual else "text", "medclipsam_version": __version__,
            "settings": settings, "concepts": rows,
        }
        write_report(report, staging / REPORT_JSON, staging / REPORT_CSV)
        if options.preview:
            names = {label_id: name for name, label_id in plan.concepts.items()}
            overlay_png(volume, torch.from_numpy(labels), names, staging / PREVIEW_FILE)
        _publish(staging, final)
    return "done", final


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM like Ctrl-C while the batch runs, so temporary folders are cleaned up either way."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _plan(options: SegmentOptions, summary: BatchSummary) -> _Plan | None:
    """Resolve prompts (unknown ones are recorded as failures), manual prompts, device and model source once;
    None when no prompt is known."""
    from medclipsam.models.default import default_model_path

    if options.batch_size < 1:
        raise InputError(None, f"--batch-size {options.batch_size} must be at least 1", "Use e.g. --batch-size 8")
    try:
        intensity_transform(options.modality, options.window)
    except ValueError as error:
        raise InputError(None, str(error), "Pick a listed value") from None
    card = load_card(options.card)
    concepts, typed, unknown = resolve_prompts(options.prompts, card)
    for failure in unknown:
        _fail(summary, failure.what, failure.reason)
    manual = [parse_manual_prompt(t, "box", options.prompts) for t in options.boxes]
    manual += [parse_manual_prompt(t, "point", options.prompts) for t in options.points]
    if not concepts:
        return None
    concept_of = _manual_concepts(manual, options.prompts, card, concepts)
    manual = [p for p in manual if p.word in concept_of]
    source = str(Path(options.model).resolve()) if options.model else f"default ({default_model_path()})"
    return _Plan(options, Path(options.out), concepts, typed, manual, concept_of, _device(options.device), source)


def _write_summary(out: Path, summary: BatchSummary) -> None:
    data = {"done": summary.done, "skipped": summary.skipped, "interrupted": summary.interrupted,
            "failed": [{"input": f.what, "reason": f.reason} for f in summary.failed], "exit_code": summary.exit_code}
    atomic_write(out / SUMMARY_FILE, lambda temp: Path(temp).write_text(json.dumps(data, indent=2) + "\n"))


def _print_summary(summary: BatchSummary, out: Path, quiet: bool) -> None:
    if quiet and not summary.failed and not summary.interrupted:
        return
    head = (f"medclipsam segment: {len(summary.done)} done, {len(summary.skipped)} already done, "
            f"{len(summary.failed)} failed{' (interrupted)' if summary.interrupted else ''}; results in {out}")
    lines = [head] + [f"  FAILED {f.what}: {f.reason}" for f in summary.failed]
    if summary.interrupted:
        lines.append("  re-run the same command to finish the scans not done yet")
    print("\n".join(lines), file=sys.stderr)


def _fail(summary: BatchSummary, what: str, reason: str) -> None:
    """Record a failure and say it in one line at once."""
    summary.failed.append(Failure(what, reason))
    tqdm.write(f"medclipsam: error: {what}: {reason}", file=sys.stderr)


def _run_scan(plan: _Plan, job: ScanJob, summary: BatchSummary) -> None:
    """Segment one scan with its own progress bar; failures are recorded, a model that cannot load stops the batch."""
    bar = tqdm(desc=job.scan_id, unit="slice", disable=_bars_off(plan.options), position=1, leave=False,
               file=sys.stderr)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    try:
        status, folder = _process(plan, job, progress)
    except WeightsError as error:
        _fail(summary, "model", str(error))
        summary.model_failed = True
        return
    except MedClipSamError as error:
        _fail(summary, str(job.path), str(error).removeprefix(f"{job.path}: "))
        return
    except Exception as error:  # one bad scan must not stop the batch; say it is unexpected
        _fail(summary, str(job.path), f"unexpected {type(error).__name__}: {error} (please report this)")
        return
    finally:
        bar.close()
    (summary.done if status == "done" else summary.skipped).append(job.scan_id)
    if not plan.options.quiet:
        tqdm.write(f"{job.scan_id}: {'already done' if status == 'skipped' else 'done'} -> {folder}", file=sys.stderr)
    print(folder / MASK_FILE, flush=True)


def run_batch(options: SegmentOptions) -> int:
    """Segment every scan of the batch, print a summary and return the exit code (see `exit_codes`)."""
    summary = BatchSummary()
    plan = _plan(options, summary)
    if plan is None:
        print("medclipsam: error: no --prompt names a known organ; nothing to do", file=sys.stderr)
        return exit_codes.NOTHING_RAN
    plan.out.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(plan.out)
    jobs, missing = find_scans(options.inputs, plan.out)
    for failure in missing:
        _fail(summary, failure.what, failure.reason)
    bar = tqdm(jobs, desc="scans", unit="scan", disable=_bars_off(options), position=0, file=sys.stderr)
    try:
        with _sigterm_as_interrupt():
            for job in bar:
                _run_scan(plan, job, summary)
                if summary.model_failed:
                    break
    except KeyboardInterrupt:
        summary.interrupted = True
    finally:
        bar.close()
    _write_summary(plan.out, summary)
    _print_summary(summary, plan.out, options.quiet)
    return summary.exit_code
