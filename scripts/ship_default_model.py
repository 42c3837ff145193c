"""Copy a trained run's checkpoint into the package as the shipped default model (float16: half the size).

Usage: python scripts/ship_default_model.py RUN/model   (the README's text-only training run)
"""
from __future__ import annotations

import argparse

import torch

from medclipsam.models.default import default_model_path
from medclipsam.training.checkpoints import load_model, read_checkpoint, save_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="checkpoint folder written by medclipsam train (RUN/model)")
    args = parser.parse_args()
    _, _, extra = read_checkpoint(args.checkpoint)
    model = load_model(args.checkpoint)
    target = save_checkpoint(model, default_model_path(), extra={**extra, "shipped_from": str(args.checkpoint)},
                             overwrite=True, dtype=torch.float16)
    print(target)


if __name__ == "__main__":
    main()
