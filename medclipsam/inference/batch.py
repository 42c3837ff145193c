"""`medclipsam segment`: segment organs by name in a batch of scans, loading the model once.

Each scan gets a folder OUT/<scan id>/ holding labels.nii.gz (a label map in the scan's exact geometry, values from
the concept card) and/or, for a DICOM series with --output-type dicom_seg / both, segmentation.dcm (a DICOM SEG of
the series), report.json and report.csv (per concept: label value, present or absent, voxels, volume in mL, axial
slice range, mean confidence, how it was prompted; with --statistics also intensity mean / SD / median, bounding box
in mm and 3D components) and, with --preview, preview.png. Organs with a --box / --point are segmented from them, the
others by name, in one run. The folder is built under a hidden temporary name and renamed into place in one step, so
a scan's folder either is complete or does not exist. Re-running the same command skips scans whose folder holds a
report made with the same settings (resume); --overwrite redoes them. An unknown organ name or a scan that cannot be
used is reported in one line, the batch goes on, and a summary at the end (also OUT/summary.json) lists every
failure with its reason.

Order of work: the arguments are checked, then --out is checked, created and locked (`output_folder`), all before
the heavy libraries load, so these mistakes are reported at once and nothing is written for them. From then on,
whatever happens (failures, Ctrl-C, SIGTERM), OUT/summary.json records it and the lock is released.

Exit codes (`medclipsam.inference.exit_codes`, also in --help): 0 every scan done and every prompt known; 1 some
scans or prompts failed, the others were done; 2 nothing could be done (bad arguments or --out, no known prompt,
no scan could be segmented, model missing or unusable); 130 interrupted (re-run to finish the missing scans).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from tqdm.auto import tqdm

from medclipsam.errors import MedClipSamError, WeightsError
from medclipsam.inference import exit_codes
from medclipsam.inference.batch_summary import BatchSummary, print_summary, write_summary
from medclipsam.inference.interrupts import (caused_by_interrupt, interrupts_deferred, interrupts_ignored,
                                            interrupts_raised)
from medclipsam.inference.output_folder import lock_output, prepare_output, remove_leftovers
from medclipsam.inference.segment_request import Request, SegmentOptions, bars_off, check_request

if TYPE_CHECKING:
    from medclipsam.inference.discovery import ScanJob
    from medclipsam.inference.scan_step import Plan

__all__ = ["SegmentOptions", "run_batch"]
ProcessScan = Callable[["Plan", "ScanJob", Callable[[int, int], None]], tuple[str, Path]]


def _failure_reason(error: Exception, job: ScanJob) -> str:
    """One line on why a scan failed: the project's own message, a file system error, or an unexpected error."""
    if isinstance(error, MedClipSamError):
        return str(error).removeprefix(f"{job.path}: ")
    if isinstance(error, OSError) and error.strerror:
        where = f" ({error.filename})" if error.filename else ""
        return f"a file could not be read or written: {error.strerror}{where}"
    return f"unexpected {type(error).__name__}: {error} (please report this)"


def _run_scan(plan: Plan, job: ScanJob, summary: BatchSummary, process: ProcessScan) -> None:
    """Segment one scan (`scan_step.process_scan`) with its own progress bar; failures are recorded, a model that
    cannot load stops the batch."""
    bar = tqdm(desc=job.scan_id, unit="slice", disable=bars_off(plan.options), position=1, leave=False,
               file=sys.stderr)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    try:
        status, folder = process(plan, job, progress)
    except WeightsError as error:
        summary.setup_failed = True
        summary.fail("model", str(error))
        return
    except Exception as error:  # one bad scan must not stop the batch
        summary.fail(str(job.path), _failure_reason(error, job))
        return
    finally:
        bar.close()
    (summary.done if status == "done" else summary.skipped).append(job.scan_id)
    if not plan.options.quiet:
        tqdm.write(f"{job.scan_id}: {'already done' if status == 'skipped' else 'done'} -> {folder}", file=sys.stderr)
    print(folder / plan.options.result_file, flush=True)


def _run(options: SegmentOptions, request: Request, out: Path, summary: BatchSummary) -> None:
    """Resolve the plan, find the scans and segment them. The heavy libraries (torch, MONAI, the model) load here,
    after the quick checks."""
    from medclipsam.inference.discovery import find_scans
    from medclipsam.inference.scan_step import make_plan, process_scan

    try:
        plan = make_plan(options, request, out)
    except MedClipSamError as error:
        summary.setup_failed = True
        summary.fail("model" if isinstance(error, WeightsError) else "settings", str(error))
        return
    jobs, missing = find_scans(options.inputs, out)
    for failure in missing:
        summary.fail(failure.what, failure.reason)
    bar = tqdm(jobs, desc="scans", unit="scan", disable=bars_off(options), position=0, file=sys.stderr)
    try:
        for job in bar:
            _run_scan(plan, job, summary, process_scan)
            if summary.setup_failed:
                break
    finally:
        bar.close()


def _finish(summary: BatchSummary, out: Path, quiet: bool) -> None:
    """Write OUT/summary.json and print the summary (a summary that cannot be written is said, not raised)."""
    try:
        write_summary(out, summary)
    except OSError as error:
        summary.fail(str(out), f"summary.json could not be written ({error.strerror})")
    print_summary(summary, out, quiet)


def run_batch(options: SegmentOptions) -> int:
    """Segment every scan of the batch, print a summary and return the exit code (see `exit_codes`)."""
    summary = BatchSummary()
    with interrupts_raised():
        request = check_request(options, summary)
        if request is None:
            print("medclipsam: error: no --prompt names a known organ; nothing to do", file=sys.stderr)
            return exit_codes.NOTHING_RAN
        out = prepare_output(options.out, options.inputs)
        lock = None
        try:
            with interrupts_deferred():  # an interrupt waits until the lock is taken, then lands here
                lock = lock_output(out)
            remove_leftovers(out)
            _run(options, request, out, summary)
        except BaseException as error:
            if not caused_by_interrupt(error):
                raise
            summary.interrupted = True
        finally:
            if lock is not None:
                with interrupts_ignored():
                    _finish(summary, out, options.quiet)
                    lock.release()
    return summary.exit_code
