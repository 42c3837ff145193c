"""Fit a model's organ offsets (`medclipsam.models.organ_offsets`) offline, in one command, and store them in its
folder. Run it after scripts/fit_slice_gate.py: the offsets are fitted on gated masks, as the predictor applies them.

Training cases: the slice gate's phantoms (seeds 600 and up, whole scans). For each, the model's text-only
probabilities of every organ of the phantom card, gated, on the phantom's own grid. Then coordinate ascent, organ by
organ, over offsets from OFFSET_GRID, for the mean Dice over cases and organs after the clean-up `segment` applies.
Then the offsets are checked on cases they never saw: the demo phantoms of seeds 500 and 503-506 and the real CT of
data/real_ct_abdomen (the shipped model's training patient: a check that they do no harm, not generalisation).

Usage: python scripts/fit_organ_offsets.py [--model default] [--cases 28] [--sweeps 2] [--cache runs/organ_offsets]
                                           [--threads 2]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from fit_slice_gate import MASK_THRESHOLD, cached_cases, held_out_dice, provenance, training_phantom
from medclipsam.data.concepts import load_card
from medclipsam.experiments.real_scans import dice
from medclipsam.inference.cleanup import clean_label_map
from medclipsam.inference.predictor import Predictor
from medclipsam.models.factory import create_model, default_model_path
from medclipsam.models.organ_offsets import OrganOffsets

OFFSET_GRID = (-2.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0)


def gated_case(predictor: Predictor, names: list[str], seed: int, folder: Path) -> dict:
    """A phantom's gated text-only probabilities on its own grid (uint8, 255 = 1) and its truth label map."""
    phantom = training_phantom(seed)
    phantom.to_nifti(folder / "ct.nii.gz", folder / "truth.nii.gz", overwrite=True)
    predictor.set_volume(folder / "ct.nii.gz")
    frame, probabilities, confidence = predictor.text_probabilities(names)
    gate = predictor.model.slice_gate
    if gate is not None:
        gate.apply(probabilities, confidence, names, frame.slice_mm, frame.settings.pixel_mm, MASK_THRESHOLD)
    source = frame.to_source(probabilities)
    ids = {name: value for value, name in load_card("phantom").label_map().items()}
    truth = np.zeros(phantom.label.shape, dtype=np.uint8)
    for k, name in enumerate(names):
        truth[phantom.label == ids[name]] = k + 1
    return {"probabilities": (source * 255).round().to(torch.uint8), "truth": torch.from_numpy(truth)}


def logits(case: dict) -> np.ndarray:
    """(K, X, Y, Z) float32 logits of a cached case's probabilities."""
    probabilities = case["probabilities"].float().div(255).clamp(1e-4, 1 - 1e-4)
    return torch.logit(probabilities).numpy()


def case_dice(case_logits: np.ndarray, truth: np.ndarray, offsets: np.ndarray, names: list[str]) -> np.ndarray:
    """Dice per organ of the cleaned-up label map that `offsets` give (each voxel: the organ of highest shifted logit,
    where it is above 0)."""
    shifted = case_logits + offsets[:, None, None, None]
    labels = np.where(shifted.max(axis=0) > 0, shifted.argmax(axis=0) + 1, 0).astype(np.uint8)
    labels = clean_label_map(labels, {k + 1: name for k, name in enumerate(names)})
    return np.array([dice(labels == k + 1, truth == k + 1) for k in range(len(offsets))])


def fit(cases: list[tuple[np.ndarray, np.ndarray]], names: list[str], sweeps: int) -> tuple[np.ndarray, float]:
    """Offsets from OFFSET_GRID by coordinate ascent on the mean Dice over cases and organs, and that mean."""
    offsets = np.zeros(len(names), dtype=np.float32)

    def mean_dice(candidate: np.ndarray) -> float:
        return float(np.mean([case_dice(case_logits, truth, candidate, names).mean() for case_logits, truth in cases]))

    best = mean_dice(offsets)
    print(f"training phantoms: mean Dice {best:.4f} without offsets", flush=True)
    for _ in range(sweeps):
        for k, name in enumerate(names):
            for value in OFFSET_GRID:
                candidate = offsets.copy()
                candidate[k] = value
                if value != offsets[k] and (score := mean_dice(candidate)) > best + 1e-4:
                    best, offsets = score, candidate
            print(f"  {name}: offset {offsets[k]:+.1f}, mean Dice {best:.4f}", flush=True)
    return offsets, best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="'default' or a checkpoint folder (the offsets go there)")
    parser.add_argument("--cases", type=int, default=28, help="training phantoms (seeds from 600)")
    parser.add_argument("--sweeps", type=int, default=2, help="passes of coordinate ascent over the organs")
    parser.add_argument("--cache", default="runs/organ_offsets", help="folder for per-case probabilities (resumable)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    folder = default_model_path() if args.model == "default" else Path(args.model)
    model = create_model(folder)
    model.organ_offsets = None  # fitted on what the model and its gate give alone
    names = list(load_card("phantom").names())
    predictor = Predictor(model, device="cpu", runtime="torch")
    start = time.perf_counter()
    cached = cached_cases(args.cache, args.cases, lambda seed, cache: gated_case(predictor, names, seed, cache))
    offsets, training_dice = fit([(logits(case), case["truth"].numpy()) for case in cached], names, args.sweeps)
    fitted = OrganOffsets({name: float(value) for name, value in zip(names, offsets)}, {})
    model.organ_offsets = fitted
    rows = held_out_dice(predictor, names, Path(args.cache), switch="organ_offsets")
    made = provenance("fit_organ_offsets.py", args, {"mean_dice": round(training_dice, 4), "grid": list(OFFSET_GRID)},
                      rows, start)
    path = OrganOffsets(fitted.offsets, made).save(folder)
    print(f"wrote {path}: " + ", ".join(f"{name} {value:+.1f}" for name, value in fitted.offsets.items()))


if __name__ == "__main__":
    main()
