"""One scan of a `medclipsam segment` batch: the plan resolved once (settings checked against the libraries, the model
loaded on first use), then per scan: load, segment, write the results (label map, DICOM SEG, report with statistics,
preview) into a staging folder and publish it."""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from tqdm import tqdm
from transformers.utils import logging as transformers_logging

from medclipsam import __version__
from medclipsam.data.intensity import intensity_transform
from medclipsam.data.concepts import ConceptCard
from medclipsam.data.io import load_scan, to_ras
from medclipsam.errors import InputError
from medclipsam.inference.dicom_seg import Algorithm, write_dicom_seg
from medclipsam.inference.discovery import ScanJob
from medclipsam.inference.output_folder import (
    MASK_FILE, PREVIEW_FILE, REPORT_CSV, REPORT_JSON, already_done, publish, staging,
)
from medclipsam.inference.predictor import Predictor, Segmentation, pick_device
from medclipsam.inference.presence import Presence, assess, presence_columns, without_absent
from medclipsam.inference.preview import overlay_png
from medclipsam.inference.prompt_args import ManualPrompt, place_prompts
from medclipsam.inference.report import axial_axis, voxel_volume_ml, volume_report, write_report
from medclipsam.inference.segment_request import SEG_FILE, Request, SegmentOptions, bars_off
from medclipsam.inference.statistics import merge_statistics, organ_statistics
from medclipsam.models.checkpoints import read_checkpoint
from medclipsam.models import factory


@dataclass
class Plan:
    """Everything the per-scan step needs, resolved once for the batch."""

    options: SegmentOptions
    out: Path
    card: ConceptCard
    concepts: dict[str, int]  # canonical name -> card label id, in prompt order
    prompt_words: dict[str, str]  # canonical name -> the word typed
    manual: list[ManualPrompt]
    concept_of: dict[str, str]  # manual prompt word -> canonical name
    device: torch.device
    model_source: str
    _predictor: Predictor | None = None

    def predictor(self) -> Predictor:
        """The predictor of the model, loaded on first use (a batch whose scans are all done never loads it); the
        model's frame, with its modality and window unless --modality / --window say otherwise."""
        if self._predictor is None:
            if bars_off(self.options):
                transformers_logging.disable_progress_bar()
            model = factory.create_model(self.options.model or factory.DEFAULT_MODEL, concepts=list(self.concepts),
                                         device=self.device)
            overrides = {k: v for k, v in (("modality", self.options.modality), ("window", self.options.window))
                         if v is not None}
            model.frame = dataclasses.replace(model.frame, **overrides)
            self._predictor = Predictor(model, device=self.device, batch_size=self.options.batch_size,
                                        amp=self.options.amp, cleanup=self.options.cleanup,
                                        runtime=self.options.runtime,
                                        test_time_augmentation=self.options.test_time_augmentation,
                                        slice_gate=self.options.slice_gate,
                                        organ_offsets=self.options.organ_offsets)
        return self._predictor


def make_plan(options: SegmentOptions, request: Request, out: Path) -> Plan:
    """Check the settings the libraries know (window, device, --model's checkpoint, read once before any scan so a
    broken one stops the batch at once) and resolve them once."""
    if options.modality is not None or options.window is not None:
        try:
            intensity_transform(options.modality or "CT", options.window)
        except ValueError as error:
            raise InputError(None, f"--modality {options.modality} --window {options.window}: {error}",
                             "Pick a listed value") from None
    device = pick_device(options.device)
    if not options.model:
        source = f"default ({factory.default_model_path()})"
    elif Path(options.model).exists():
        read_checkpoint(options.model)
        source = str(Path(options.model).resolve())
    else:
        source = options.model  # a method's name
    return Plan(options, out, request.card, request.concepts, request.prompt_words, request.manual, request.concept_of,
                device, source)


def _settings(plan: Plan, job: ScanJob) -> dict[str, Any]:
    """What a scan's result depends on; a later run with the same settings skips the scan. The output type,
    statistics, test-time augmentation and the slice gate are recorded only when not the defaults, so results made
    before they existed still resume."""
    options = plan.options
    settings = {
        "scan": str(job.path.resolve()), "model": plan.model_source, "card": options.card, "concepts": plan.concepts,
        "boxes": sorted(options.boxes), "points": sorted(options.points), "coords": options.coords,
        "modality": options.modality, "window": options.window, "cleanup": options.cleanup, "preview": options.preview,
    }
    if options.output_type != "nifti":
        settings["output_type"] = options.output_type
    if options.statistics:
        settings["statistics"] = True
    if options.test_time_augmentation:
        settings["test_time_augmentation"] = True
    if not options.slice_gate:
        settings["slice_gate"] = False
    if not options.organ_offsets:
        settings["organ_offsets"] = False
    return settings


def _segmented_by(plan: Plan) -> dict[str, str]:
    """Concept -> "box" or "points" for the organs given a --box / --point; the others are segmented by name."""
    return {plan.concept_of[p.word]: "box" if p.kind == "box" else "points" for p in plan.manual}


def _mode(plan: Plan) -> str:
    """"text" (every organ by name), "manual" (every organ by --box / --point) or "text+manual"."""
    prompted = _segmented_by(plan)
    if not prompted:
        return "text"
    return "manual" if len(prompted) == len(plan.concepts) else "text+manual"


def _check_seg_input(plan: Plan, job: ScanJob) -> None:
    """A DICOM SEG references a DICOM series: any other input fails before it is segmented."""
    if plan.options.writes_seg and not job.path.is_dir():
        raise InputError(job.path, f"is not a DICOM series, and --output-type {plan.options.output_type} writes a "
                         "DICOM SEG, which references the series it segments",
                         "Segment the DICOM series folder, or run this scan with --output-type nifti")


def _segment(plan: Plan, job: ScanJob, scan: MetaTensor, progress: Callable[[int, int], None]) -> Segmentation:
    """The requested organs of one scan through the predictor: by name, or by the --box / --point prompts placed
    in the scan's RAS voxels."""
    predictor = plan.predictor()
    predictor.progress = progress
    predictor.set_volume(scan)
    boxes, points = {}, {}
    if plan.manual:
        placed = place_prompts(plan.manual, plan.concept_of, plan.options.coords, np.asarray(scan.affine),
                               predictor.ras_affine, predictor.frame.source_shape, job.path)
        boxes, points = placed.boxes, placed.points
    return predictor.predict(list(plan.concepts), boxes=boxes, points=points)


def _write_seg(plan: Plan, job: ScanJob, mask: Path, rows: list[dict], staged: Path) -> dict[str, Any]:
    """segmentation.dcm from the label map file (so its segments equal it voxel for voxel); each row gets its segment
    number (None: absent, left out of the SEG). When no organ is found a SEG cannot be written: with the NIfTI
    output the report says so, without it the scan fails."""
    absent = [row["concept"] for row in rows if not row["present"]]
    if len(absent) == len(rows):
        if not plan.options.writes_nifti:
            raise InputError(job.path, "no requested organ was found in this scan, and a DICOM SEG cannot hold empty "
                             "segments, so there is nothing to write", "Use --output-type both to keep the report "
                             "(every organ reported absent) and the empty label map")
        for row in rows:
            row["dicom_seg_segment"] = None
        return {"file": None, "segments": {}, "omitted": absent,
                "note": "no organ was found; a DICOM SEG cannot hold empty segments, so none was written"}
    model = plan.predictor().model
    algorithm = Algorithm(name=f"medclipsam {getattr(model, 'name', type(model).__name__)}", version=__version__,
                          model=plan.model_source)
    written = write_dicom_seg(mask, job.path, plan.concepts, plan.card, staged / SEG_FILE, algorithm)
    for row in rows:
        row["dicom_seg_segment"] = written.segments.get(row["concept"])
    return {"file": SEG_FILE, "segments": written.segments, "omitted": list(written.omitted),
            "note": "organs found nowhere are absent and left out (a DICOM SEG cannot hold empty segments)"}


def _judge_presence(plan: Plan, job: ScanJob, scan: MetaTensor, result: Segmentation
                    ) -> tuple[Segmentation, dict[str, Presence]]:
    """Each organ's presence verdict (`inference.presence`); organs judged absent leave the label map, and what was
    removed or flagged is said on the console (unless --quiet)."""
    verdicts = assess(result, plan.card, scan, modality=plan.predictor().settings.modality,
                      placed=_segmented_by(plan))
    if not plan.options.quiet:
        for concept, verdict in verdicts.items():
            if not verdict.present and result.mask(concept).any():
                tqdm.write(f"{job.scan_id}: {concept} reported absent ({verdict.reason})", file=sys.stderr)
            for flag in verdict.flags:
                tqdm.write(f"{job.scan_id}: {concept}: implausible? {flag}", file=sys.stderr)
    return without_absent(result, verdicts), verdicts


def _write_outputs(plan: Plan, job: ScanJob, scan: MetaTensor, result: Segmentation, settings: dict[str, Any],
                   staged: Path) -> None:
    """The scan's outputs into `staged`: the label map (kept for --output-type nifti / both) without the organs
    judged absent, the SEG, the report (presence, reason and flags per organ; with --statistics: intensities of the
    scan as read, HU for CT) and the preview."""
    options = plan.options
    result, verdicts = _judge_presence(plan, job, scan, result)
    mask = result.save(staged / MASK_FILE, values=plan.concepts)
    written = nib.load(mask)
    labels = np.asarray(written.dataobj)
    rows = volume_report(labels, written.affine, plan.concepts, result.confidence, plan.prompt_words,
                         _segmented_by(plan))
    columns = presence_columns(verdicts)
    rows = [{**row, **columns[row["concept"]]} for row in rows]
    if options.statistics:
        rows = merge_statistics(rows, organ_statistics(labels, scan, written.affine, plan.concepts))
    report = {
        "scan": str(job.path), "labels": MASK_FILE if options.writes_nifti else None, "shape": list(written.shape),
        "orientation": "".join(nib.orientations.aff2axcodes(written.affine)),
        "voxel_volume_ml": round(voxel_volume_ml(written.affine), 9), "slice_axis": axial_axis(written.affine),
        "affine": written.affine.tolist(), "mode": _mode(plan), "medclipsam_version": __version__,
        "settings": settings, "concepts": rows,
    }
    if options.writes_seg:
        report["dicom_seg"] = _write_seg(plan, job, mask, rows, staged)
    if not options.writes_nifti:
        mask.unlink()
    write_report(report, staged / REPORT_JSON, staged / REPORT_CSV)
    if options.preview:
        names = {label_id: name for name, label_id in plan.concepts.items()}
        frame = plan.predictor().settings
        volume = intensity_transform(frame.modality, frame.window)(to_ras(scan))
        overlay_png(volume, torch.from_numpy(result.recoded(plan.concepts)), names, staged / PREVIEW_FILE)


def process_scan(plan: Plan, job: ScanJob, progress: Callable[[int, int], None]) -> tuple[str, Path]:
    """Segment one scan and publish its folder; ("skipped", folder) if it was already done with these settings."""
    final = plan.out / job.scan_id
    settings = _settings(plan, job)
    if already_done(final, settings, plan.options.overwrite):
        return "skipped", final
    _check_seg_input(plan, job)
    scan = load_scan(job.path)
    result = _segment(plan, job, scan, progress)
    with staging(plan.out) as staged:
        _write_outputs(plan, job, scan, result, settings, staged)
        publish(staged, final)
    return "done", final
