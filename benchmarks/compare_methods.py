"""Every method on the same labelled CT phantoms, budget and seed: the Dice/HD95 comparison table.

Usage: HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python benchmarks/compare_methods.py [medclipsam compare options]

A thin wrapper around `medclipsam compare` (`medclipsam.experiments.comparison`): the same options, with the output
folder defaulting to benchmarks/results/compare_methods. It prints the Markdown tables and writes comparison.csv,
comparison_cases.csv and comparison.md there. See `medclipsam compare --help`.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from medclipsam.cli import main as cli_main

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "compare_methods"


def main(argv: Sequence[str] | None = None) -> int:
    """Run `medclipsam compare` with these arguments (and --out defaulting to DEFAULT_OUT)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "--out" not in args:
        args += ["--out", str(DEFAULT_OUT)]
    return cli_main(["compare", *args])


if __name__ == "__main__":
    sys.exit(main())
