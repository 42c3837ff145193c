"""Train-test prompt consistency: CLIP-Guided SAM trained text-only vs trained with mixed prompts, each evaluated
text-only and with (truth) boxes on held-out phantom slices. Prints a Markdown table (Dice pooled over slices, mean
over the phantom's organs) and writes it under benchmarks/results/.

    python benchmarks/prompt_consistency.py            # defaults: 4 training + 2 held-out phantoms, CPU minutes
"""
from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch

from medclipsam.data.concepts import load_card
from medclipsam.data.phantom import make_phantom
from medclipsam.data.slices import load_case, slice_items
from medclipsam.eval.slice_dice import pooled_slice_dice
from medclipsam.models.clip_guided_sam import CLIPGuidedSAM, CLIPGuidedSAMConfig
from medclipsam.training.trainer import TrainConfig, Trainer, cache_features


def phantom_items(folder: Path, seeds: list[int], slice_step: int) -> list[dict]:
    """Slice items (every concept listed) of phantoms with the given seeds."""
    items = []
    for seed in seeds:
        image, label = folder / f"ct{seed}.nii.gz", folder / f"lab{seed}.nii.gz"
        make_phantom(seed).to_nifti(image, label)
        case = load_case({"image": str(image), "label": str(label)})
        items += slice_items(case, load_card("phantom"), empty_ratio=0, absent_per_slice=9, slice_step=slice_step,
                             seed=seed)
    return items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-phantoms", type=int, default=4)
    parser.add_argument("--held-out", type=int, default=2)
    parser.add_argument("--slice-step", type=int, default=3)
    parser.add_argument("--similarity-steps", type=int, default=600)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--pairs-per-step", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "prompt_consistency.md"))
    args = parser.parse_args()

    card = load_card("phantom")
    organs = card.names()
    with tempfile.TemporaryDirectory() as tmp:
        train_items = phantom_items(Path(tmp), list(range(args.train_phantoms)), args.slice_step)
        test_items = phantom_items(Path(tmp), [1000 + i for i in range(args.held_out)], args.slice_step)
    torch.manual_seed(args.seed)
    base = CLIPGuidedSAM(CLIPGuidedSAMConfig(adapter_blocks="last1"))
    features = cache_features(base, train_items)
    rows = []
    for mode in ("text", "mixed"):
        torch.manual_seed(args.seed)
        model = CLIPGuidedSAM(CLIPGuidedSAMConfig(adapter_blocks="last1"))  # the cached trunk fits it: same split
        start = time.perf_counter()
        config = TrainConfig(mode=mode, steps=args.steps, similarity_steps=args.similarity_steps,
                             pairs_per_step=args.pairs_per_step, seed=args.seed)
        Trainer(model, train_items, config, features=features).fit()
        seconds = time.perf_counter() - start
        scores = {setting: pooled_slice_dice(model, test_items, organs, with_boxes=setting == "box")
                  for setting in ("text", "box")}
        rows.append((mode, scores, seconds))
    lines = [
        f"Prompt consistency on phantoms ({args.train_phantoms} training, {args.held_out} held-out; every "
        f"{args.slice_step}th slice; {args.similarity_steps} warm-up + {args.steps} pair steps x {args.pairs_per_step} "
        f"pairs; seed {args.seed}; {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads).",
        "Mean Dice over the 9 organs, pooled over held-out slices where each organ is present.",
        "",
        "| trained with | evaluated text-only | evaluated with boxes | training s |",
        "|---|---|---|---|",
    ]
    for mode, scores, seconds in rows:
        text_mean = sum(scores["text"].values()) / len(organs)
        box_mean = sum(scores["box"].values()) / len(organs)
        lines.append(f"| {'text-only' if mode == 'text' else 'mixed (text / box / points)'} | {text_mean:.3f} | "
                     f"{box_mean:.3f} | {seconds:.0f} |")
    lines += ["", "Per organ (text-only / boxes):", "", "| organ | " + " | ".join(m for m, _, _ in rows) + " |",
              "|---|" + "---|" * len(rows)]
    for organ in organs:
        cells = [f"{s['text'][organ]:.2f} / {s['box'][organ]:.2f}" for _, s, _ in rows]
        lines.append(f"| {organ} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table + "\n")


if __name__ == "__main__":
    main()
