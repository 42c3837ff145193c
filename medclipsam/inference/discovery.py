"""The scans of a `medclipsam segment` batch: files, DICOM series folders and folders of scans searched recursively,
each with the id naming its output folder."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from medclipsam.data.datalists import case_id_from_path
from medclipsam.data.io import SUPPORTED_FORMATS, is_scan_path, list_scans
from medclipsam.inference.batch_summary import Failure


@dataclass(frozen=True)
class ScanJob:
    """A scan to segment and the id naming its output folder."""

    path: Path
    scan_id: str


def _named_scans(given: Path) -> list[tuple[Path, str]]:
    """(scan, id) pairs of one input: a scan found in a folder is named by its path below that folder
    ('sub/ct.nii.gz' -> 'sub_ct')."""
    if given.is_dir() and not is_scan_path(given):
        return [(p, "_".join(p.relative_to(given).parent.parts + (case_id_from_path(p),))) for p in list_scans(given)]
    return [(given, case_id_from_path(given.resolve()))]


def _holds(folder: Path, path: Path) -> bool:
    return path == folder or folder in path.parents


def find_scans(inputs: Sequence[str | Path], out: Path) -> tuple[list[ScanJob], list[Failure]]:
    """Scan jobs for the given inputs, and a failure for each input that holds no scan, each scan whose output
    folder another scan already takes, and each scan whose output folder would replace an input."""
    out = out.resolve()
    given_paths = [Path(given).resolve() for given in inputs]
    jobs: dict[str, ScanJob] = {}
    seen: set[Path] = set()
    failures: list[Failure] = []
    for given in inputs:
        named = _named_scans(Path(given))
        if not named:
            failures.append(Failure(str(given), f"holds no scans; expected {SUPPORTED_FORMATS}"))
        for scan, scan_id in named:
            if scan.resolve() in seen:
                continue
            seen.add(scan.resolve())
            final = out / scan_id
            if scan_id in jobs:
                failures.append(Failure(str(scan), f"its output folder {final} is already taken by "
                                        f"{jobs[scan_id].path}; rename one of them or segment them in separate runs"))
            elif any(_holds(final, path) for path in [*given_paths, scan.resolve()]):
                failures.append(Failure(str(scan), f"its output folder {final} would replace an input; choose "
                                        "another --out"))
            else:
                jobs[scan_id] = ScanJob(scan, scan_id)
    return list(jobs.values()), failures
