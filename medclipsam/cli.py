"""`medclipsam` command line."""
from __future__ import annotations

import argparse
import sys

from medclipsam.errors import MedClipSamError


def _demo(args: argparse.Namespace) -> int:
    from medclipsam.inference.box_demo import format_rows, run_box_demo

    progress = (lambda _msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr))
    rows = run_box_demo(args.out, seed=args.seed, overwrite=args.overwrite, progress=progress)
    print(format_rows(rows))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Argument parser with one sub-command per job."""
    parser = argparse.ArgumentParser(prog="medclipsam", description="CLIP-Guided SAM for 3D medical images")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="segment a synthetic CT phantom with the embedded LiteMedSAM weights")
    demo.add_argument("--out", default="medclipsam-demo", help="output folder (default: ./medclipsam-demo)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--overwrite", action="store_true", help="replace outputs of an earlier run")
    demo.add_argument("--quiet", action="store_true")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; project errors become one clear line and exit code 2."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except MedClipSamError as error:
        print(f"medclipsam: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
