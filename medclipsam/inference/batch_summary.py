"""What a `medclipsam segment` batch did: scans done, skipped and failed, said as it happens, summed up at the end
on the console and in OUT/summary.json, and turned into the exit code (`exit_codes`)."""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from medclipsam.atomic import atomic_write
from medclipsam.inference import exit_codes
from medclipsam.inference.output_folder import SUMMARY_FILE


@dataclass(frozen=True)
class Failure:
    """One input that failed: which (a scan path, a prompt, the model or a setting) and why (one line)."""

    what: str
    reason: str


@dataclass
class BatchSummary:
    """Scan ids done and skipped (already done), the failures, and whether the run stopped early: interrupted, or
    set-up failed (the model or a setting is unusable)."""

    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[Failure] = field(default_factory=list)
    interrupted: bool = False
    setup_failed: bool = False

    @property
    def exit_code(self) -> int:
        """130 interrupted; 2 nothing could be done (set-up failed, or no scan done or already done); 1 some
        scans or prompts failed; 0 all done."""
        if self.interrupted:
            return exit_codes.INTERRUPTED
        if self.setup_failed or not (self.done or self.skipped):
            return exit_codes.NOTHING_RAN
        return exit_codes.FAILURES if self.failed else exit_codes.OK

    def fail(self, what: str, reason: str) -> None:
        """Record a failure and say it in one line at once."""
        self.failed.append(Failure(what, reason))
        tqdm.write(f"medclipsam: error: {what}: {reason}", file=sys.stderr)


def write_summary(out: Path, summary: BatchSummary) -> None:
    """OUT/summary.json, written atomically."""
    data = {"done": summary.done, "skipped": summary.skipped, "interrupted": summary.interrupted,
            "failed": [{"input": f.what, "reason": f.reason} for f in summary.failed], "exit_code": summary.exit_code}
    atomic_write(out / SUMMARY_FILE, lambda temp: Path(temp).write_text(json.dumps(data, indent=2) + "\n",
                                                                         encoding="utf-8"))


def print_summary(summary: BatchSummary, out: Path, quiet: bool) -> None:
    """One line of counts (with what to do when interrupted), then one line per failure; nothing when quiet and
    all went well."""
    if quiet and not summary.failed and not summary.interrupted:
        return
    counts = (f"{len(summary.done)} done, {len(summary.skipped)} already done, {len(summary.failed)} failed; "
              f"results in {out}")
    head = (f"medclipsam segment: interrupted ({counts}); re-run the same command to finish the scans not done yet"
            if summary.interrupted else f"medclipsam segment: {counts}")
    print("\n".join([head] + [f"  FAILED {f.what}: {f.reason}" for f in summary.failed]), file=sys.stderr)
