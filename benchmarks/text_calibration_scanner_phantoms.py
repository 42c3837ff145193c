"""The model's text-only calibrations (slice gate, organ offsets) on scanner-like phantoms (512 x 512, thin slices,
table, off-centre; `make_scanner_phantom`) the model never saw: mean Dice over the nine organs by name with neither,
with the gate, and with the gate and the offsets (as `segment` runs), the encoder as `segment` picks it. Prints a
Markdown table.

    python benchmarks/text_calibration_scanner_phantoms.py [--seeds 500 501] [--model default]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from medclipsam.data.concepts import load_card
from medclipsam.data.io import load_label, load_scan, to_ras
from medclipsam.data.phantom import make_scanner_phantom
from medclipsam.experiments.real_scans import dice
from medclipsam.inference.predictor import Predictor
from medclipsam.models.factory import create_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[500, 501])
    parser.add_argument("--model", default="default")
    args = parser.parse_args()
    torch.manual_seed(0)
    card = load_card("phantom")
    names, ids = card.names(), {name: value for value, name in card.label_map().items()}
    predictor = Predictor(create_model(args.model), device="cpu", runtime="auto")
    print("| scanner-like phantom | shape | neither | slice gate | gate and organ offsets | by organ, with both |\n"
          "|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for seed in args.seeds:
            image, label = Path(folder) / f"ct_{seed}.nii.gz", Path(folder) / f"truth_{seed}.nii.gz"
            make_scanner_phantom(seed).to_nifti(image, label, overwrite=True)
            scan = load_scan(str(image))
            truth = np.asarray(to_ras(load_label(str(label), like=scan)))[0]
            predictor.set_volume(image)
            means, scores = [], {}
            for gated, offset in ((False, False), (True, False), (True, True)):
                predictor.slice_gate, predictor.organ_offsets = gated, offset
                found = predictor.predict(names)
                scores = {name: dice(found.mask(name), truth == ids[name]) for name in names}
                means.append(float(np.mean(list(scores.values()))))
            organs = ", ".join(f"{name} {value:.2f}" for name, value in scores.items())
            columns = " | ".join(f"{mean:.3f}" for mean in means)
            print(f"| {seed} | {' x '.join(map(str, truth.shape))} | {columns} | {organs} |", flush=True)


if __name__ == "__main__":
    main()
