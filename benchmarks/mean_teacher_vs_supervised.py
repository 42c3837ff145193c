"""Does mean teacher beat the supervised UNet with few labelled cases? Dice on held-out CT phantoms over seeds.

Usage: OMP_NUM_THREADS=1 python benchmarks/mean_teacher_vs_supervised.py [--steps N] [--seeds 0 1 2] ...

Phantoms (`write_phantom_dataset`) are split once (by --data-seed) into held-out, labelled and unlabelled cases;
the seeds vary only training (weights, slice order, teacher noise). Both methods get the same budget: the same steps
and labelled slices per step; mean teacher also draws unlabelled slices (every slice of the unlabelled volumes,
their labels unread). Prints, per organ and overall, mean Dice ± sd over seeds (Dice per seed: mean over held-out
cases; overall: mean over organs), the paired difference, and the intensity-threshold predictor as the floor.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from typing import Sequence

import numpy as np

from medclipsam.data.concepts import ConceptCard, load_card
from medclipsam.data.datalists import load_datalist, split_cases, train_val_split
from medclipsam.data.phantom import PHANTOM_CARD, write_phantom_dataset
from medclipsam.data.slices import load_case, slice_items, volume_slices
from medclipsam.eval.metrics import evaluate_case
from medclipsam.methods.base import SegmentationMethod, TrainBudget, build_method, segment_case

COMPARED = ("supervised_unet", "mean_teacher")
FLOOR = "intensity_threshold"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options; the defaults run in minutes on 2 CPU cores."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labelled", type=int, default=2, help="labelled training phantoms")
    parser.add_argument("--unlabelled", type=int, default=6, help="unlabelled training phantoms")
    parser.add_argument("--test", type=int, default=3, help="held-out phantoms")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the phantoms and of the case split")
    parser.add_argument("--shape", type=int, nargs=3, default=[128, 128, 32], help="phantom grid (X Y Z)")
    parser.add_argument("--image-size", type=int, default=256, help="slice size S of the items")
    parser.add_argument("--internal-size", type=int, default=128, help="resolution the UNets work at")
    parser.add_argument("--steps", type=int, default=200, help="optimisation steps per training run")
    parser.add_argument("--slices-per-step", type=int, default=4, help="labelled slices per step")
    parser.add_argument("--unlabelled-per-step", type=int, default=None,
                        help="unlabelled slices per mean-teacher step (default: as many as labelled)")
    parser.add_argument("--ema-decay", type=float, default=0.99)
    parser.add_argument("--consistency", type=float, default=0.1, help="final consistency weight")
    parser.add_argument("--rampup-steps", type=int, default=None, help="consistency ramp length (default: all steps)")
    parser.add_argument("--noise-sd", type=float, default=0.1, help="sd of the noise on the teacher's input")
    parser.add_argument("--predict-with", choices=("student", "teacher"), default="student")
    return parser.parse_args(argv)


def load_data(args: argparse.Namespace, root: str, card: ConceptCard) -> tuple[list[dict], list[dict], list[dict]]:
    """Labelled slice items, unlabelled slice items (images only) and held-out loaded cases."""
    total = args.labelled + args.unlabelled + args.test
    datalist = load_datalist(write_phantom_dataset(root, total, seed=args.data_seed, shape=tuple(args.shape)))
    train, held_out = train_val_split(datalist, n_val=args.test, seed=args.data_seed)
    labelled_cases, unlabelled_cases = split_cases(train, args.labelled, seed=args.data_seed)
    labelled = [item for entry in labelled_cases
                for item in slice_items(load_case(entry), card, size=args.image_size, seed=args.data_seed)]
    unlabelled = [{"image": image, "case_id": entry["case_id"], "slice_index": index}
                  for entry in unlabelled_cases
                  for index, image, _ in volume_slices(load_case(entry)["image"], size=args.image_size)]
    return labelled, unlabelled, [load_case(entry) for entry in held_out]


def method_options(name: str, args: argparse.Namespace) -> dict:
    """Build options of a method from the command line."""
    options: dict = {"image_size": args.image_size}
    if name in COMPARED:
        options["internal_size"] = args.internal_size
    if name == "mean_teacher":
        options.update(ema_decay=args.ema_decay, consistency=args.consistency, rampup_steps=args.rampup_steps,
                       noise_sd=args.noise_sd, unlabelled_per_step=args.unlabelled_per_step,
                       predict_with=args.predict_with)
    return options


def held_out_dice(method: SegmentationMethod, cases: Sequence[dict], card: ConceptCard) -> dict[str, float]:
    """Dice per organ, averaged over the held-out cases."""
    spacing = tuple(float(s) for s in cases[0]["image"].pixdim[:3])
    rows = [row for case in cases
            for row in evaluate_case(segment_case(method, case, card), case["label"], spacing, card.label_map(),
                                     case["case_id"], method.name)]
    return {name: float(np.mean([r["dice"] for r in rows if r["concept"] == name])) for name in card.names()}


def cell(values: Sequence[float]) -> str:
    """mean ± sample sd of per-seed values, 3 decimals."""
    sd = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return f"{np.mean(values):.3f} ± {sd:.3f}"


def table(results: dict[str, list[dict[str, float]]], organs: Sequence[str]) -> str:
    """Markdown table: one row per organ plus "overall", a column per method and the paired difference."""
    for per_seed in results.values():
        for scores in per_seed:
            scores["overall"] = float(np.mean([scores[o] for o in organs]))
    header = ["organ", *results, "mean_teacher − supervised_unet"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for organ in [*organs, "overall"]:
        differences = [t[organ] - s[organ] for t, s in zip(results["mean_teacher"], results["supervised_unet"])]
        cells = [cell([scores[organ] for scores in per_seed]) for per_seed in results.values()]
        lines.append("| " + " | ".join([organ, *cells, cell(differences)]) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """Train both methods at every seed, evaluate on the held-out phantoms and print the table."""
    args = parse_args(argv)
    card = load_card(PHANTOM_CARD)
    organs = card.names()
    with tempfile.TemporaryDirectory() as root:
        labelled, unlabelled, held_out = load_data(args, root, card)
        print(f"{len(labelled)} labelled slices, {len(unlabelled)} unlabelled slices, {len(held_out)} held-out cases",
              file=sys.stderr)
        results: dict[str, list[dict[str, float]]] = {name: [] for name in (FLOOR, *COMPARED)}
        for seed in args.seeds:
            budget = TrainBudget(steps=args.steps, slices_per_step=args.slices_per_step, seed=seed)
            for name in results:
                start = time.perf_counter()
                method = build_method(name, organs, **method_options(name, args))
                method.fit(labelled, unlabelled, budget)
                results[name].append(held_out_dice(method, held_out, card))
                print(f"seed {seed} {name}: overall Dice {np.mean(list(results[name][-1].values())):.3f} "
                      f"({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    print(table(results, organs))


if __name__ == "__main__":
    main()
