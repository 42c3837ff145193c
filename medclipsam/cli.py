"""`medclipsam` command line."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from medclipsam.errors import MedClipSamError


def _progress(args: argparse.Namespace):
    return (lambda _msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr))


def _demo(args: argparse.Namespace) -> int:
    from medclipsam.inference.box_demo import format_rows, run_box_demo

    rows = run_box_demo(args.out, seed=args.seed, overwrite=args.overwrite, progress=_progress(args))
    print(format_rows(rows))
    return 0


def _phantoms(args: argparse.Namespace) -> int:
    from medclipsam.data.phantom import write_phantom_dataset

    path = write_phantom_dataset(args.out, args.n, seed=args.seed, overwrite=args.overwrite,
                                 n_validation=args.n_validation)
    print(path)
    return 0


def _model_config(args: argparse.Namespace):
    from medclipsam.models.clip_guided_sam import CLIPGuidedSAMConfig

    vl_kwargs = json.loads(args.vision_language_options) if args.vision_language_options else {}
    return CLIPGuidedSAMConfig(sam=args.sam, sam_checkpoint=args.sam_checkpoint, vision_language=args.vision_language,
                               vision_language_kwargs=vl_kwargs, adapter_blocks=args.adapter_blocks)


def _train(args: argparse.Namespace) -> int:
    import torch

    from medclipsam.data.concepts import load_card
    from medclipsam.data.datalists import load_datalist, split_cases
    from medclipsam.training.pipeline import train_clip_guided_sam
    from medclipsam.training.trainer import TrainConfig

    cases = load_datalist(args.datalist, key=args.key)
    if args.labelled is not None:
        labelled = float(args.labelled) if "." in args.labelled else int(args.labelled)
        cases, _ = split_cases(cases, labelled, seed=args.seed)
    config = TrainConfig(steps=args.steps, similarity_steps=args.similarity_steps, pairs_per_step=args.pairs_per_step,
                         mode=args.mode, grad_accumulation=args.grad_accumulation, amp=not args.no_amp,
                         checkpoint_every=args.checkpoint_every, seed=args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device.replace("auto", "cpu")
    train_clip_guided_sam(cases, load_card(args.card), args.out, _model_config(args), config,
                          slice_step=args.slice_step, modality=args.modality, window=args.window,
                          show_progress=not args.quiet, device=device)
    print(Path(args.out) / "model")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from medclipsam.data.concepts import load_card
    from medclipsam.data.datalists import load_datalist
    from medclipsam.eval.metrics import summarize, write_table
    from medclipsam.methods.clip_guided_sam import CLIPGuidedSAMMethod
    from medclipsam.methods.evaluation import evaluate_method
    from medclipsam.training.checkpoints import load_model

    card = load_card(args.card)
    model = load_model(args.model, device=args.device if args.device != "auto" else "cpu")
    method = CLIPGuidedSAMMethod(card.names(), model=model)
    rows = evaluate_method(method, load_datalist(args.datalist, key=args.key), card, setting=args.setting,
                           modality=args.modality, window=args.window)
    out = Path(args.out)
    write_table(rows, out, fmt="md" if out.suffix == ".md" else "csv", overwrite=args.overwrite)
    summary = summarize(rows)
    for row in summary:
        print(f"{row['concept']:<24} dice {row['dice_mean']:.3f} ± {row['dice_sd']:.3f}  hd95 {row['hd95_mean']:.1f} mm")
    return 0


def _add_data_options(parser: argparse.ArgumentParser, key: str) -> None:
    parser.add_argument("--datalist", required=True, help="decathlon-style dataset.json")
    parser.add_argument("--key", default=key, help=f"datalist key with the cases (default: {key})")
    parser.add_argument("--card", default="phantom", help="concept card naming the label values (default: phantom)")
    parser.add_argument("--modality", default="CT", choices=["CT", "MR", "MRI"])
    parser.add_argument("--window", default="abdomen", help="CT window preset (default: abdomen)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--quiet", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    """Argument parser with one sub-command per job."""
    parser = argparse.ArgumentParser(prog="medclipsam", description="CLIP-Guided SAM for 3D medical images")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="segment a synthetic CT phantom with the embedded LiteMedSAM weights")
    demo.add_argument("--out", default="medclipsam-demo", help="output folder (default: ./medclipsam-demo)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--overwrite", action="store_true", help="replace outputs of an earlier run")
    demo.add_argument("--quiet", action="store_true")
    demo.set_defaults(run=_demo)

    phantoms = commands.add_parser("phantoms", help="write synthetic CT phantoms as an MSD-style labelled dataset")
    phantoms.add_argument("--out", required=True)
    phantoms.add_argument("--n", type=int, default=8, help="training cases (default: 8)")
    phantoms.add_argument("--n-validation", type=int, default=3, help="held-out labelled cases (default: 3)")
    phantoms.add_argument("--seed", type=int, default=0)
    phantoms.add_argument("--overwrite", action="store_true")
    phantoms.set_defaults(run=_phantoms)

    train = commands.add_parser("train", help="train CLIP-Guided SAM (adapters + heads) on a labelled datalist")
    _add_data_options(train, "training")
    train.add_argument("--out", required=True, help="run folder: model/, log.csv, trainer_state.pt (resumable)")
    train.add_argument("--labelled", help="use only this many labelled cases (or a fraction like 0.5)")
    train.add_argument("--mode", default="text", choices=["text", "box", "points", "mixed"],
                       help="prompts to train with; match how you will infer (default: text)")
    train.add_argument("--sam", default="litemedsam", help="litemedsam, vit_b, vit_l, vit_h or medsam")
    train.add_argument("--sam-checkpoint", help="checkpoint file for SAM ViT / MedSAM backbones")
    train.add_argument("--vision-language", default="minilm", help="minilm (offline), open_clip or biomedclip")
    train.add_argument("--vision-language-options", help='JSON, e.g. \'{"model_name": "ViT-B-16", "pretrained": "f.pt"}\'')
    train.add_argument("--adapter-blocks", default="last1", help="all, lastN or comma-free spec (default: last1)")
    train.add_argument("--steps", type=int, default=300, help="pair steps through the adapted encoder")
    train.add_argument("--similarity-steps", type=int, default=600, help="similarity-map warm-up steps")
    train.add_argument("--pairs-per-step", type=int, default=8)
    train.add_argument("--grad-accumulation", type=int, default=1)
    train.add_argument("--checkpoint-every", type=int, default=50)
    train.add_argument("--slice-step", type=int, default=1, help="use every n-th slice of each volume")
    train.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's choice)")
    train.add_argument("--no-amp", action="store_true", help="full precision on CUDA")
    train.add_argument("--seed", type=int, default=0)
    train.set_defaults(run=_train)

    evaluate = commands.add_parser("evaluate", help="Dice/HD95/NSD of a trained model on labelled cases")
    _add_data_options(evaluate, "validation")
    evaluate.add_argument("--model", required=True, help="checkpoint folder (the run's model/)")
    evaluate.add_argument("--setting", default="text", choices=["text", "manual"],
                          help="text-only, or manual with boxes from the truth (default: text)")
    evaluate.add_argument("--out", required=True, help="per-case table, .csv or .md")
    evaluate.add_argument("--overwrite", action="store_true")
    evaluate.set_defaults(run=_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; project errors become one clear line and exit code 2."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except MedClipSamError as error:
        print(f"medclipsam: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
