"""Per-step training log as CSV, kept consistent with a resumed run."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Mapping


class CsvLog:
    """Appends one row per step to a CSV file; on resume, rows after the resumed step are dropped first."""

    def __init__(self, path: str | Path, keep_steps_up_to: int = 0) -> None:
        self.path = Path(path)
        self.columns: list[str] | None = None
        if self.path.is_file():
            with self.path.open(newline="") as handle:
                rows = [r for r in csv.DictReader(handle) if int(r["step"]) <= keep_steps_up_to]
            self.path.unlink()
            for row in rows:
                self.write(row)

    def write(self, row: Mapping[str, object]) -> None:
        """Append a row; the first row fixes the columns (later rows may leave some empty)."""
        new = self.columns is None
        if new:
            self.columns = ["step", "phase", "total"] + sorted(k for k in row if k not in ("step", "phase", "total"))
            self.columns += [c for c in ("similarity", "mask", "iou") if c not in self.columns]
        with self.path.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.columns, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
