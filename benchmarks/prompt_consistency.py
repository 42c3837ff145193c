"""Train-test prompt consistency: CLIP-Guided SAM trained text-only vs trained with mixed prompts, each evaluated
text-only and with (truth) boxes on held-out phantom slices. Prints a Markdown table (Dice pooled over slices, mean
over the phantom's organs) and writes it under benchmarks/results/. The experiment is
`medclipsam.experiments.prompt_consistency` (also run by notebooks/03_prompt_consistency.ipynb); slices are in
LiteMedSAM's body-centred frame (256 px over --field-of-view mm).

    python benchmarks/prompt_consistency.py            # defaults: 4 training + 2 held-out phantoms, CPU minutes
"""
from __future__ import annotations

import argparse
import platform
import sys
import tempfile
from pathlib import Path

import torch

from medclipsam.atomic import atomic_write
from medclipsam.data.concepts import load_card
from medclipsam.data.datalists import load_datalist
from medclipsam.data.frame import FrameSettings
from medclipsam.data.phantom import PHANTOM_CARD, write_phantom_dataset
from medclipsam.experiments.prompt_consistency import consistency_items, consistency_table, run_prompt_consistency
from medclipsam.models.clip_guided_sam import CLIPGuidedSAMConfig
from medclipsam.training.trainer import TrainConfig

HELD_OUT_SEED = 1000  # held-out phantoms are seeds 1000, 1001, ...


def main() -> None:
    """Train one model per prompt mode on phantoms, evaluate both ways, print and write the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-phantoms", type=int, default=4)
    parser.add_argument("--held-out", type=int, default=2)
    parser.add_argument("--slice-step", type=int, default=3)
    parser.add_argument("--field-of-view", type=float, default=400.0, help="side of the body-centred frame in mm")
    parser.add_argument("--similarity-steps", type=int, default=600)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--pairs-per-step", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "prompt_consistency.md"))
    args = parser.parse_args()

    card = load_card(PHANTOM_CARD)
    model_config = CLIPGuidedSAMConfig(adapter_blocks="last1")
    frame = FrameSettings(size=256, field_of_view_mm=args.field_of_view)  # LiteMedSAM's input size
    with tempfile.TemporaryDirectory() as tmp:
        train = load_datalist(write_phantom_dataset(Path(tmp) / "train", args.train_phantoms, seed=0))
        test = load_datalist(write_phantom_dataset(Path(tmp) / "test", args.held_out, seed=HELD_OUT_SEED))
        train_items = consistency_items(train, card, frame, args.slice_step)
        test_items = consistency_items(test, card, frame, args.slice_step)
    train_config = TrainConfig(steps=args.steps, similarity_steps=args.similarity_steps,
                               pairs_per_step=args.pairs_per_step, seed=args.seed)
    results = run_prompt_consistency(train_items, test_items, card.names(), model_config, train_config,
                                     progress=lambda message: print(message, file=sys.stderr))
    caption = (
        f"Prompt consistency on phantoms ({args.train_phantoms} training, {args.held_out} held-out; every "
        f"{args.slice_step}th slice; {args.similarity_steps} warm-up + {args.steps} pair steps x {args.pairs_per_step} "
        f"pairs; seed {args.seed}; {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads).\n"
        "Mean Dice over the 9 organs, pooled over held-out slices where each organ is present."
    )
    table = consistency_table(results, caption)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda temp: Path(temp).write_text(table + "\n"))


if __name__ == "__main__":
    main()
