"""Fit a model's slice gate (`medclipsam.models.slice_gate`) offline, in one command, and store it in its folder.

Training cases: classic phantoms of seeds 600 and up (the shipped model trained on seeds 0-5 and 100-103; the demo and
the test-time augmentation benchmark use 500-506), 192 mm long at 12, 6, 8 and 4 mm slices in turn, every organ of
the phantom card asked by name; each case also gives `--crops` random z-windows (40-100% of its slices), so that the
gate learns organs cut by the scan's ends. Per slice where the model found an organ, the target is whether the
phantom's truth has the organ on that slice. Then the gate is checked on cases it never saw: the demo phantoms of
seeds 500 and 503-506 and the real CT of data/real_ct_abdomen (the shipped model's training patient: a check that the
gate does no harm, not generalisation), mean Dice over the nine organs without and with it.

Usage: python scripts/fit_slice_gate.py [--model default] [--cases 28] [--crops 3] [--threshold 0.5] [--min-span-mm 60]
                                        [--cache runs/slice_gate] [--threads 2]
"""
from __future__ import annotations

import argparse
import datetime
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from medclipsam.data.concepts import load_card
from medclipsam.data.phantom import Phantom, make_phantom
from medclipsam.experiments.demos import DEMO_SHAPE, DEMO_SPACING
from medclipsam.experiments.real_scans import dice
from medclipsam.inference.predictor import Predictor
from medclipsam.models.factory import create_model, default_model_path
from medclipsam.models.slice_gate import OrganGate, SliceGate, area_profiles, slice_features

FIRST_SEED = 600
THICKNESS_MM = (12.0, 6.0, 8.0, 4.0)
LENGTH_MM = 192.0
HELD_OUT_SEEDS = (500, 503, 504, 505, 506)
REAL_CT = Path(__file__).resolve().parents[1] / "data" / "real_ct_abdomen"
MASK_THRESHOLD = 0.5


def training_phantom(seed: int) -> Phantom:
    """The training phantom of `seed`: LENGTH_MM long, its slice thickness taken from THICKNESS_MM in turn."""
    thickness = THICKNESS_MM[(seed - FIRST_SEED) % len(THICKNESS_MM)]
    return make_phantom(seed, shape=(128, 128, round(LENGTH_MM / thickness)), spacing=(3.0, 3.0, thickness))


def profile_case(predictor: Predictor, names: list[str], seed: int, folder: Path) -> dict:
    """Area and confidence profiles of every organ on a phantom's frame slices, and where its truth has them."""
    phantom = training_phantom(seed)
    phantom.to_nifti(folder / "ct.nii.gz", folder / "truth.nii.gz", overwrite=True)
    predictor.set_volume(folder / "ct.nii.gz")
    frame, probabilities, confidence = predictor.text_probabilities(names)
    ids = {name: value for value, name in load_card("phantom").label_map().items()}
    truth = torch.from_numpy(np.stack([phantom.label == ids[name] for name in names]).astype(np.float32))
    present = frame.slices(truth, nearest=True).flatten(2).amax(dim=2) > 0.5
    return {"area": area_profiles(probabilities, MASK_THRESHOLD, frame.settings.pixel_mm),
            "confidence": confidence.double().numpy(), "present": present.numpy(), "slice_mm": frame.slice_mm}


def windows(length: int, crops: int, rng: np.random.Generator) -> list[slice]:
    """The whole range and `crops` random windows of 40-100% of it."""
    chosen = [slice(0, length)]
    for _ in range(crops):
        size = int(rng.integers(max(2, int(0.4 * length)), length + 1))
        start = int(rng.integers(0, length - size + 1))
        chosen.append(slice(start, start + size))
    return chosen


def fit(cases: list[dict], names: list[str], crops: int, threshold: float, min_span_mm: float, seed: int = 0
        ) -> SliceGate:
    """A gate per organ from the profiled cases (organs never wrongly found, or never rightly, get none)."""
    rng = np.random.default_rng(seed)
    samples: dict[int, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {k: [] for k in range(len(names))}
    for case in cases:
        for window in windows(len(case["area"]), crops, rng):
            for k in range(len(names)):
                area = case["area"][window, k]
                found = area > 0
                if found.any():
                    features = slice_features(area, case["confidence"][window, k], case["slice_mm"])
                    samples[k].append((features[found], case["present"][window, k][found], area[found]))
    organs = {}
    for k, name in enumerate(names):
        if not samples[k]:
            continue
        features, present, weights = (np.concatenate(parts) for parts in zip(*samples[k]))
        if present.any() and not present.all():
            organs[name] = OrganGate.fit(features, present, weights)
    return SliceGate(organs, threshold, min_span_mm, {})


def held_out_dice(predictor: Predictor, names: list[str], folder: Path, switch: str = "slice_gate") -> list[dict]:
    """Mean Dice over the nine organs without and with the predictor's `switch` (its attribute: "slice_gate" or
    "organ_offsets") on the held-out demo phantoms and the real CT."""
    card = load_card("phantom")
    ids = {name: value for value, name in card.label_map().items()}
    rows = []
    for seed in HELD_OUT_SEEDS:
        phantom = make_phantom(seed, shape=DEMO_SHAPE, spacing=DEMO_SPACING)
        phantom.to_nifti(folder / "ct.nii.gz", folder / "truth.nii.gz", overwrite=True)
        rows.append(_scores(predictor, names, folder / "ct.nii.gz", {n: phantom.label == ids[n] for n in names},
                            f"demo phantom {seed} (12 mm slices)", switch))
    if (REAL_CT / "ct.nii.gz").is_file():
        import nibabel as nib
        labels = np.asarray(nib.load(REAL_CT / "labels.nii.gz").dataobj)
        real = load_card("totalsegmentator")
        truth = {n: labels == real.resolve(n).label_id for n in names}
        rows.append(_scores(predictor, names, REAL_CT / "ct.nii.gz", truth, "real CT (training patient)", switch))
    return rows


def _scores(predictor: Predictor, names: list[str], scan: Path, truth: dict, case: str, switch: str) -> dict:
    predictor.set_volume(scan)
    row = {"case": case}
    for label, on in (("without", False), ("with", True)):
        setattr(predictor, switch, on)
        found = predictor.predict(names)
        scores = {name: dice(found.mask(name), truth[name]) for name in names}
        row[label] = round(float(np.mean(list(scores.values()))), 4)
        row[f"{label} per organ"] = {name: round(value, 3) for name, value in scores.items()}
    print(f"{case}: mean Dice {row['without']:.3f} without {switch}, {row['with']:.3f} with", flush=True)
    return row


def cached_cases(cache: str | Path, count: int, make: Callable[[int, Path], dict]) -> list[dict]:
    """`make(seed, cache)` for the first `count` training seeds, each kept in `cache` so that a rerun resumes."""
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    cases = []
    for seed in range(FIRST_SEED, FIRST_SEED + count):
        path = cache / f"phantom_{seed}.pt"
        if not path.is_file():
            torch.save(make(seed, cache), path)
            print(f"ran the model on phantom {seed}", flush=True)
        cases.append(torch.load(path, weights_only=False))
    return cases


def provenance(script: str, args: argparse.Namespace, training: dict, held_out: list[dict], start: float) -> dict:
    """How a fit was made: the model, the date, the command that repeats it, its training cases and held-out check."""
    options = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("cache", "threads"))
    return {"model": str(args.model), "date": datetime.date.today().isoformat(),
            "command": f"python scripts/{script} {options}",
            "training": {"phantom_seeds": [FIRST_SEED, FIRST_SEED + args.cases - 1], **training},
            "held_out": held_out, "seconds": round(time.perf_counter() - start)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="'default' or a checkpoint folder (the gate goes there)")
    parser.add_argument("--cases", type=int, default=28, help="training phantoms (seeds from 600)")
    parser.add_argument("--crops", type=int, default=3, help="random z-windows per training case")
    parser.add_argument("--threshold", type=float, default=0.5, help="gate probability below which a slice drops")
    parser.add_argument("--min-span-mm", type=float, default=60.0, help="shortest scan (mm along z) it judges")
    parser.add_argument("--cache", default="runs/slice_gate", help="folder for per-case profiles (resumable)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    folder = default_model_path() if args.model == "default" else Path(args.model)
    model = create_model(folder)
    model.slice_gate = model.organ_offsets = None  # profiles and targets come from the model alone
    names = list(load_card("phantom").names())
    predictor = Predictor(model, device="cpu", runtime="torch")
    start = time.perf_counter()
    cases = cached_cases(args.cache, args.cases, lambda seed, cache: profile_case(predictor, names, seed, cache))
    gate = fit(cases, names, args.crops, args.threshold, args.min_span_mm)
    model.slice_gate = gate
    rows = held_out_dice(predictor, names, Path(args.cache))
    made = provenance("fit_slice_gate.py", args, {"thickness_mm": list(THICKNESS_MM), "crops": args.crops}, rows, start)
    path = SliceGate(gate.organs, gate.threshold, gate.min_span_mm, made).save(folder)
    print(f"wrote {path} (gates for {', '.join(gate.organs)})")


if __name__ == "__main__":
    main()
