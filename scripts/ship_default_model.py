"""Copy a trained run's model into the package as the shipped default model (float16: half the size), in the common
checkpoint format with its frame settings.

Usage: python scripts/ship_default_model.py RUN/model   (the README's default-model training run)
Then python scripts/fit_slice_gate.py, python scripts/fit_organ_offsets.py and python scripts/calibrate_presence.py,
for the new weights.
"""
from __future__ import annotations

import argparse

import torch

from medclipsam.models.checkpoints import read_checkpoint, save_checkpoint
from medclipsam.models.factory import default_model_path, load_checkpoint
from medclipsam.models.organ_offsets import OFFSETS_FILE
from medclipsam.models.slice_gate import GATE_FILE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="model folder written by medclipsam train (RUN/model)")
    args = parser.parse_args()
    saved = read_checkpoint(args.checkpoint)
    method = load_checkpoint(args.checkpoint)
    target = save_checkpoint(method, default_model_path(), saved.name, saved.concepts, saved.options, method.frame,
                             extra={**saved.extra, "shipped_from": str(args.checkpoint)}, overwrite=True,
                             dtype=torch.float16)
    for fitted, script in ((GATE_FILE, "fit_slice_gate.py"), (OFFSETS_FILE, "fit_organ_offsets.py")):
        stale = default_model_path() / fitted
        if stale.is_file():
            stale.unlink()
            print(f"removed {stale} (fitted for the weights replaced): run scripts/{script}")
    print(target)


if __name__ == "__main__":
    main()
