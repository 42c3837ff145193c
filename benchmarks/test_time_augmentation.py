"""Test-time augmentation (`segment --tta`) against one view, on demo phantoms the shipped model never saw: classic
phantoms of seeds 500 (the demo's own) and up at the demo's geometry (128 x 128 x 16, 3 x 3 x 12 mm), every organ by
name through the Predictor (PyTorch encoder, as the demo runs). Per seed: mean Dice over the nine organs and seconds,
without and with the five views; the weakest organs apart. Prints and writes a Markdown table.

    python benchmarks/test_time_augmentation.py [--seeds 500 501 ...] [--model default]
                                                [--out benchmarks/results/test_time_augmentation.md]
"""
from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from medclipsam.atomic import atomic_write
from medclipsam.data.concepts import load_card
from medclipsam.data.phantom import make_phantom
from medclipsam.experiments.demos import DEMO_SEED, DEMO_SHAPE, DEMO_SPACING
from medclipsam.experiments.real_scans import dice
from medclipsam.inference.predictor import TEST_TIME_VIEWS, Predictor
from medclipsam.models.factory import create_model

WEAK = ("pancreas", "gallbladder")


def score_seed(predictor: Predictor, seed: int, folder: Path) -> dict[str, tuple[float, dict[str, float], float]]:
    """{"one view" | "five views": (mean Dice, Dice per organ, seconds)} on the demo phantom of `seed`."""
    card = load_card("phantom")
    phantom = make_phantom(seed, shape=DEMO_SHAPE, spacing=DEMO_SPACING)
    phantom.to_nifti(folder / f"ct_{seed}.nii.gz", folder / f"truth_{seed}.nii.gz", overwrite=True)
    names, ids = card.names(), {name: value for value, name in card.label_map().items()}
    predictor.set_volume(folder / f"ct_{seed}.nii.gz")
    results = {}
    for label, augmented in (("one view", False), ("five views", True)):
        predictor.test_time_augmentation = augmented
        start = time.perf_counter()
        found = predictor.predict(names)
        seconds = time.perf_counter() - start
        scores = {name: dice(found.mask(name), phantom.label == ids[name]) for name in names}
        results[label] = (float(np.mean(list(scores.values()))), scores, seconds)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(DEMO_SEED, DEMO_SEED + 6)))
    parser.add_argument("--model", default="default")
    parser.add_argument("--out", default="benchmarks/results/test_time_augmentation.md")
    args = parser.parse_args()
    torch.manual_seed(0)
    predictor = Predictor(create_model(args.model), device="cpu", runtime="torch")
    lines = ["| seed | one view: mean Dice | five views: mean Dice | one view: " + " / ".join(WEAK)
             + " | five views: " + " / ".join(WEAK) + " | seconds, one / five views |", "|---|---|---|---|---|---|"]
    means = {"one view": [], "five views": []}
    with tempfile.TemporaryDirectory() as folder:
        for seed in args.seeds:
            results = score_seed(predictor, seed, Path(folder))
            for label in means:
                means[label].append(results[label][0])
            weak = {label: " / ".join(f"{results[label][1][w]:.2f}" for w in WEAK) for label in results}
            lines.append(f"| {seed} | {results['one view'][0]:.3f} | {results['five views'][0]:.3f} | "
                         f"{weak['one view']} | {weak['five views']} | {results['one view'][2]:.0f} / "
                         f"{results['five views'][2]:.0f} |")
            print(lines[-1], flush=True)
    lines.append(f"| mean of {len(args.seeds)} | {np.mean(means['one view']):.3f} | {np.mean(means['five views']):.3f}"
                 " | | | |")
    header = (f"# Test-time augmentation on demo phantoms\n\n`python benchmarks/test_time_augmentation.py --seeds "
              f"{' '.join(map(str, args.seeds))} --model {args.model}` on {platform.processor() or platform.machine()}"
              f", {torch.get_num_threads()} torch thread(s). Views (field-of-view scale, (columns, rows) shift in pixels): "
              f"{TEST_TIME_VIEWS}; probabilities averaged on the frame. Seconds of `predict`: one view encodes "
              "and segments the slices; five views then reuse those encodings and encode the four moved views.\n\n")
    text = header + "\n".join(lines) + "\n"
    print(lines[-1])
    atomic_write(Path(args.out), lambda temp: Path(temp).write_text(text, encoding="utf-8"))


if __name__ == "__main__":
    main()
