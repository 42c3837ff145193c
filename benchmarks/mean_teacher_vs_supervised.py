"""Does mean teacher beat the supervised UNet with few labelled cases? Dice on held-out CT phantoms over seeds.

Usage: OMP_NUM_THREADS=1 python benchmarks/mean_teacher_vs_supervised.py [--steps N] [--seeds 0 1 2 3 4] ...

Phantoms (`write_phantom_dataset`) are split once (by --data-seed) into held-out, labelled and unlabelled cases;
the seeds vary only training (weights, slice order, teacher noise). Both methods get the same budget: the same steps
and labelled slices per step; mean teacher also draws unlabelled slices (every slice of the unlabelled volumes,
their labels unread). Prints, per organ and overall, mean Dice ± sd over seeds (Dice per seed: mean over held-out
cases; overall: mean over organs), the paired difference, and the intensity-threshold predictor as the floor.
Every slice reaches the methods in the body-centred frame (--field-of-view mm over --image-size pixels). The
experiment is `medclipsam.experiments.label_efficiency` (also run by notebooks/04_semi_supervised.ipynb).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from typing import Sequence

from medclipsam.data.concepts import load_card
from medclipsam.data.datalists import load_datalist, train_val_split
from medclipsam.data.frame import FrameSettings
from medclipsam.data.phantom import PHANTOM_CARD, write_phantom_dataset
from medclipsam.experiments.label_efficiency import paired_table, run_label_efficiency
from medclipsam.training.pipeline import load_pool

COMPARED = ("supervised_unet", "mean_teacher")
FLOOR = "intensity_threshold"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options; the defaults (the README's figure) take about 35 minutes on one CPU core."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labelled", type=int, default=2, help="labelled training phantoms")
    parser.add_argument("--unlabelled", type=int, default=6, help="unlabelled training phantoms")
    parser.add_argument("--test", type=int, default=3, help="held-out phantoms")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="training seeds")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the phantoms and of the case split")
    parser.add_argument("--shape", type=int, nargs=3, default=[128, 128, 32], help="phantom grid (X Y Z)")
    parser.add_argument("--image-size", type=int, default=256, help="slice size S of the items")
    parser.add_argument("--field-of-view", type=float, default=400.0, help="side of the body-centred frame in mm")
    parser.add_argument("--internal-size", type=int, default=128, help="resolution the UNets work at")
    parser.add_argument("--steps", type=int, default=1000, help="optimisation steps per training run")
    parser.add_argument("--slices-per-step", type=int, default=4, help="labelled slices per step")
    parser.add_argument("--unlabelled-per-step", type=int, default=None,
                        help="unlabelled slices per mean-teacher step (default: as many as labelled)")
    parser.add_argument("--ema-decay", type=float, default=None,
                        help="teacher's EMA decay (default: follow the budget, min(0.99, 1 - 20 / steps))")
    parser.add_argument("--consistency", type=float, default=1.0, help="final consistency weight")
    parser.add_argument("--rampup-steps", type=int, default=None, help="consistency ramp length (default: all steps)")
    parser.add_argument("--noise-sd", type=float, default=0.1, help="sd of the noise on the teacher's input")
    parser.add_argument("--student-warp", type=float, default=0.3,
                        help="strength of the random similarity transform of the student's unlabelled view (0: none)")
    parser.add_argument("--predict-with", choices=("student", "teacher"), default="teacher")
    return parser.parse_args(argv)


def method_options(name: str, args: argparse.Namespace) -> dict:
    """Build options of a method from the command line."""
    options: dict = {"image_size": args.image_size}
    if name in COMPARED:
        options["internal_size"] = args.internal_size
    if name == "mean_teacher":
        options.update(ema_decay=args.ema_decay, consistency=args.consistency, rampup_steps=args.rampup_steps,
                       noise_sd=args.noise_sd, unlabelled_per_step=args.unlabelled_per_step,
                       student_warp=args.student_warp, predict_with=args.predict_with)
    return options


def main(argv: Sequence[str] | None = None) -> None:
    """Train both methods at every seed, evaluate on the held-out phantoms and print the table."""
    args = parse_args(argv)
    card = load_card(PHANTOM_CARD)
    total = args.labelled + args.unlabelled + args.test
    with tempfile.TemporaryDirectory() as root:
        datalist = load_datalist(write_phantom_dataset(root, total, seed=args.data_seed, shape=tuple(args.shape)))
        train, held_out = train_val_split(datalist, n_val=args.test, seed=args.data_seed)
        frame = FrameSettings(size=args.image_size, field_of_view_mm=args.field_of_view)
        pool = load_pool(train, held_out, card, frame, seed=args.data_seed)
    methods = {name: method_options(name, args) for name in (FLOOR, *COMPARED)}
    rows = run_label_efficiency(pool, card, methods, [args.labelled], args.seeds, args.steps, args.slices_per_step,
                                data_seed=args.data_seed, progress=lambda message: print(message, file=sys.stderr))
    print(paired_table(rows, "mean_teacher", "supervised_unet", args.labelled))


if __name__ == "__main__":
    main()
