"""`medclipsam` command line."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from pathlib import Path

from medclipsam.errors import InputError, MedClipSamError
from medclipsam.inference import exit_codes
from medclipsam.inference.interrupts import caused_by_interrupt, interrupts_raised
from medclipsam.segment_command import add_segment_command, add_tta_option
from medclipsam.runtime import tune_allocator

_LIBRARY_NOISE = (  # warnings that tell a user nothing: (start of the message, category)
    ("Importing from timm", FutureWarning),
    ("NvImgCodecPydicomReader", UserWarning),
    ("monai.metrics.utils get_mask_edges", FutureWarning),  # MONAI's own surface Dice calls it the old way
)
_NOISY_LOGGERS = ("monai.data.nvimgcodec_pydicom_plugin",)


def _progress(args: argparse.Namespace):
    return (lambda _msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr))


def _demo(args: argparse.Namespace) -> int:
    from medclipsam.experiments.demos import DEMO_SEED, format_rows, run_demo

    rows = run_demo(args.out, seed=DEMO_SEED if args.seed is None else args.seed, overwrite=args.overwrite,
                    quiet=args.quiet, model=args.model, oracle_boxes=args.oracle_boxes, progress=_progress(args),
                    test_time_augmentation=args.test_time_augmentation)
    print(format_rows(rows))
    return 0


def _phantoms(args: argparse.Namespace) -> int:
    from medclipsam.data.phantom import write_phantom_dataset

    print(write_phantom_dataset(args.out, args.n, seed=args.seed, overwrite=args.overwrite,
                                n_validation=args.n_validation, scanner=args.scanner))
    return 0


def _json_option(text: str | None, flag: str) -> dict:
    """A JSON object given on the command line, or {} when absent; InputError when it is not one."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise InputError(None, f"{flag} is not JSON ({error})", f"Quote it, e.g. {flag} '{{\"lr\": 0.001}}'") from error
    if not isinstance(value, dict):
        raise InputError(None, f"{flag} must be a JSON object, got {text!r}", f"e.g. {flag} '{{\"lr\": 0.001}}'")
    return value


def _labelled(text: str | None) -> int | float | None:
    """--labelled: a count of cases, or a fraction such as 0.5."""
    if text is None:
        return None
    try:
        return float(text) if "." in text else int(text)
    except ValueError:
        raise InputError(None, f"--labelled {text!r} is not a count or a fraction", "e.g. --labelled 2 or 0.5") \
            from None


def _frame(args: argparse.Namespace, size: int):
    from medclipsam.data.frame import FrameSettings

    return FrameSettings(size=size, field_of_view_mm=args.fov, slice_spacing_mm=args.slice_spacing,
                         modality=args.modality, window=args.window)


def _method_options(args: argparse.Namespace, image_size: int) -> dict:
    """Build options of --method: what makes it work with --sam (CLIP-Guided SAM: its model and training settings),
    updated with --method-options."""
    from medclipsam.experiments.comparison import default_options
    from medclipsam.models.factory import available_methods

    if args.method not in available_methods():
        raise InputError(None, f"unknown --method {args.method!r}", f"Choose one of {', '.join(available_methods())}")
    options = default_options(args.method, image_size, args.sam, args.sam_checkpoint)
    if args.method == "clip_guided_sam" and hasattr(args, "similarity_steps"):
        options["model_options"].update(
            vision_language=args.vision_language, adapter_blocks=args.adapter_blocks,
            vision_language_kwargs=_json_option(args.vision_language_options, "--vision-language-options"))
        options["train_options"] = {"similarity_steps": args.similarity_steps, "pairs_per_step": args.pairs_per_step,
                                    "mode": args.mode, "grad_accumulation": args.grad_accumulation,
                                    "amp": not args.no_amp, "checkpoint_every": args.checkpoint_every}
    return {**options, **_json_option(args.method_options, "--method-options")}


def _train(args: argparse.Namespace) -> int:
    import torch

    from medclipsam.data.augment import AugmentSettings
    from medclipsam.data.concepts import load_card
    from medclipsam.data.datalists import load_datalist
    from medclipsam.inference.predictor import pick_device
    from medclipsam.models.sam import sam_input_size
    from medclipsam.training.loop import TrainBudget
    from medclipsam.training.pipeline import train_on_datalist

    torch.set_num_threads(args.threads or torch.get_num_threads())
    size = sam_input_size(args.sam, args.sam_checkpoint)
    folder = train_on_datalist(
        args.method, _method_options(args, size), load_datalist(args.datalist, key=args.key), load_card(args.card),
        args.out, _frame(args, size), _labelled(args.labelled),
        TrainBudget(steps=args.steps, slices_per_step=args.slices_per_step, seed=args.seed),
        AugmentSettings(views=args.augment_views), slice_step=args.slice_step, empty_ratio=args.empty_slices,
        device=pick_device(args.device), overwrite=args.overwrite, progress=_progress(args))
    print(folder)
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from medclipsam.data.concepts import load_card
    from medclipsam.data.datalists import load_datalist
    from medclipsam.eval.evaluate import evaluate_method
    from medclipsam.eval.metrics import summarize, write_table
    from medclipsam.inference.predictor import pick_device
    from medclipsam.models.factory import DEFAULT_MODEL, create_model
    from medclipsam.models.sam import sam_input_size

    card = load_card(args.card)
    device = pick_device(args.device)
    if args.model:
        model = create_model(args.model, device=device)
        if args.method and args.method != model.name:
            raise InputError(args.model, f"this folder holds a trained {model.name!r}, not {args.method!r}",
                             f"Pass --method {model.name}, or leave --method out")
    elif args.method in (None, "clip_guided_sam"):
        model = create_model(DEFAULT_MODEL, device=device)
    else:
        model = create_model(args.method, card.names(), device,
                             **_method_options(args, sam_input_size(args.sam, args.sam_checkpoint)))
    if args.setting not in model.settings:
        raise InputError(None, f"{model.name} does not support the {args.setting!r} setting",
                         f"Use --setting {' or '.join(model.settings)}")
    try:
        rows = evaluate_method(model, load_datalist(args.datalist, key=args.key), card, setting=args.setting,
                               batch_size=args.batch_size)
    except KeyError as error:
        raise InputError(args.model, str(error).strip('"'), "Evaluate with the --card the method was trained on") \
            from error
    out = Path(args.out)
    write_table(rows, out, fmt="md" if out.suffix == ".md" else "csv", overwrite=args.overwrite)
    for row in summarize(rows):
        print(f"{row['concept']:<24} dice {row['dice_mean']:.3f} ± {row['dice_sd']:.3f}  hd95 {row['hd95_mean']:.1f} mm")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from medclipsam.data.augment import AugmentSettings
    from medclipsam.data.concepts import load_card
    from medclipsam.experiments.comparison import compare_on_datalist, default_methods, method_options
    from medclipsam.experiments.comparison_tables import check_output_folder, write_comparison
    from medclipsam.inference.predictor import pick_device
    from medclipsam.models.sam import sam_input_size
    from medclipsam.training.loop import TrainBudget

    names = default_methods() if args.methods == "all" else [n.strip() for n in args.methods.split(",") if n.strip()]
    size = sam_input_size(args.sam, args.sam_checkpoint)
    methods = method_options(names, size, args.sam, args.sam_checkpoint,
                             _json_option(args.method_options, "--method-options"))
    counts = [int(c) for c in args.labelled.split(",")]
    check_output_folder(args.out, overwrite=args.overwrite)
    result, _ = compare_on_datalist(
        args.data, load_card(args.card), methods, counts,
        TrainBudget(steps=args.steps, slices_per_step=args.slices_per_step, seed=args.seed), _frame(args, size),
        n_training=args.n_training, n_held_out=args.n_held_out, settings=args.settings.split(","),
        phantom_shape=tuple(args.phantom_shape), data_seed=args.data_seed, device=pick_device(args.device),
        resume_dir=args.out, augment=AugmentSettings(views=args.augment_views), progress=_progress(args))
    paths = write_comparison(result, args.out, overwrite=args.overwrite)
    print(paths["markdown"].read_text(encoding="utf-8"))
    print("\n".join(str(p) for p in paths.values()), file=sys.stderr)
    return 0


def _add_method_options(parser: argparse.ArgumentParser, default: str | None) -> None:
    parser.add_argument("--method", default=default,
                        help="segmentation method: clip_guided_sam (default), esc_net, sam_lora, two_stage, "
                        "supervised_unet, mean_teacher, sam3, intensity_threshold or empty")
    parser.add_argument("--method-options", help="JSON build options of --method, e.g. '{\"rank\": 8}' (see the "
                        "method's docstring)")


def _add_sam_options(parser: argparse.ArgumentParser, role: str) -> None:
    parser.add_argument("--sam", default="litemedsam", help=f"SAM backbone {role} (litemedsam, vit_b/l/h, medsam)")
    parser.add_argument("--sam-checkpoint", help="checkpoint file for SAM ViT / MedSAM backbones")


def _add_frame_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--modality", default="CT", choices=["CT", "MR", "MRI"])
    parser.add_argument("--window", default="abdomen", help="CT window preset (default: abdomen)")
    parser.add_argument("--fov", type=float, default=400.0, help="side of the model's body-centred frame in mm "
                        "(default: 400, an adult abdomen; pixels are fov / input size)")
    parser.add_argument("--slice-spacing", type=float, help="working slice spacing in mm (default: the scan's own)")
    parser.add_argument("--augment-views", type=int, default=4, help="views per labelled slice, the original "
                        "included: rotation, scale, shift, window, noise, blur (default: 4; 1: none)")


def _add_data_options(parser: argparse.ArgumentParser, key: str) -> None:
    parser.add_argument("--datalist", required=True, help="decathlon-style dataset.json")
    parser.add_argument("--key", default=key, help=f"datalist key with the cases (default: {key})")
    parser.add_argument("--card", default="phantom", help="concept card naming the label values (default: phantom)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--quiet", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    """Argument parser with one sub-command per job."""
    parser = argparse.ArgumentParser(prog="medclipsam", description="CLIP-Guided SAM for 3D medical images")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="segment every organ of a synthetic CT phantom by its name with the "
                               "shipped text-only model, and score it against the phantom's truth")
    demo.add_argument("--out", default="medclipsam-demo", help="output folder (default: ./medclipsam-demo)")
    demo.add_argument("--seed", type=int, default=None, help="phantom seed (default: 500)")
    demo.add_argument("--model", help="checkpoint folder instead of the shipped model")
    demo.add_argument("--oracle-boxes", action="store_true",
                      help="each organ's 3D box from the phantom's truth instead of its name (manual mode: the "
                      "pristine LiteMedSAM answers; checks the weights and the geometry)")
    add_tta_option(demo)
    demo.add_argument("--overwrite", action="store_true", help="replace outputs of an earlier run")
    demo.add_argument("--quiet", action="store_true")
    demo.set_defaults(run=_demo)

    phantoms = commands.add_parser("phantoms", help="write synthetic CT phantoms as an MSD-style labelled dataset")
    phantoms.add_argument("--out", required=True)
    phantoms.add_argument("--n", type=int, default=8, help="training cases (default: 8)")
    phantoms.add_argument("--n-validation", type=int, default=3, help="held-out labelled cases (default: 3)")
    phantoms.add_argument("--seed", type=int, default=0)
    phantoms.add_argument("--scanner", action="store_true", help="scanner-like geometry (512 matrix, 0.6-1 mm pixels, "
                          "0.6-5 mm slices, table, arms, off-centre patient, contrast phases) drawn per case")
    phantoms.add_argument("--overwrite", action="store_true")
    phantoms.set_defaults(run=_phantoms)

    train = commands.add_parser("train", help="train CLIP-Guided SAM (adapters + heads), or any --method, on a "
                                "labelled datalist")
    _add_data_options(train, "training")
    _add_method_options(train, "clip_guided_sam")
    _add_frame_options(train)
    train.add_argument("--slices-per-step", type=int, default=2,
                       help="labelled slices per step, methods other than clip_guided_sam (default: 2)")
    train.add_argument("--overwrite", action="store_true", help="replace a method saved in OUT/model")
    train.add_argument("--out", required=True, help="run folder: model/, log.csv, trainer_state.pt (resumable)")
    train.add_argument("--labelled", help="use only this many labelled cases (or a fraction like 0.5)")
    train.add_argument("--mode", default="text", choices=["text", "box", "points", "mixed"],
                       help="prompts to train with; match how you will infer (default: text)")
    _add_sam_options(train, "of the method")
    train.add_argument("--vision-language", default="minilm", help="minilm (offline), open_clip or biomedclip")
    train.add_argument("--vision-language-options", help='JSON, e.g. \'{"model_name": "ViT-B-16", "pretrained": "f.pt"}\'')
    train.add_argument("--adapter-blocks", default="last1", help="all, lastN or comma-free spec (default: last1)")
    train.add_argument("--steps", type=int, default=300, help="optimisation steps (clip_guided_sam: pair steps "
                       "through the adapted encoder, after its warm-up)")
    train.add_argument("--similarity-steps", type=int, default=2000, help="similarity-map warm-up steps (default: 2000)")
    train.add_argument("--pairs-per-step", type=int, default=8)
    train.add_argument("--grad-accumulation", type=int, default=1)
    train.add_argument("--checkpoint-every", type=int, default=50)
    train.add_argument("--slice-step", type=int, default=1, help="use every n-th slice of each volume")
    train.add_argument("--empty-slices", type=float, default=0.1, help="slices without any card organ, trained as "
                       "'absent', per slice with one (default: 0.1; inf: all of them)")
    train.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's choice)")
    train.add_argument("--no-amp", action="store_true", help="full precision on CUDA")
    train.add_argument("--seed", type=int, default=0)
    train.set_defaults(run=_train)

    evaluate = commands.add_parser("evaluate", help="Dice/HD95/NSD of a trained model on labelled cases")
    _add_data_options(evaluate, "validation")
    _add_method_options(evaluate, None)
    evaluate.add_argument("--model", help="checkpoint folder (the run's model/); without it, clip_guided_sam is the "
                          "shipped model and any other --method is built untrained from --method-options (zero-shot "
                          "methods such as sam3)")
    _add_sam_options(evaluate, "of an untrained --method")
    evaluate.add_argument("--batch-size", type=int, default=None, help="slices per model batch (default: 4 on a CPU, 8 on CUDA)")
    evaluate.add_argument("--setting", default="text", choices=["text", "manual"],
                          help="text-only, or manual with boxes from the truth (default: text)")
    evaluate.add_argument("--out", required=True, help="per-case table, .csv or .md")
    evaluate.add_argument("--overwrite", action="store_true")
    evaluate.set_defaults(run=_evaluate)

    compare = commands.add_parser(
        "compare", help="train methods on the same labelled cases and budget; Dice/HD95 table as CSV + Markdown",
        description="Train every method on the same labelled subset with the same budget and seed, evaluate each on "
        "the held-out cases in each setting it supports, and write comparison.csv, comparison_cases.csv and "
        "comparison.md into --out. Without --data, CT phantoms are written on the fly. Resumable: each method's rows "
        "are kept in --out/partial/ as it finishes, and a re-run with the same settings reuses them.")
    compare.add_argument("--out", required=True, help="output folder")
    compare.add_argument("--methods", default="all", help="comma-separated method names, or all (default: every "
                         "method except the optional sam3)")
    compare.add_argument("--labelled", default="2", help="labelled volumes, comma-separated counts (default: 2)")
    compare.add_argument("--data", help="folder with an MSD-style dataset.json (or the file); default: phantoms")
    compare.add_argument("--n-training", type=int, default=6, help="training phantoms, labelled + unlabelled "
                         "(default: 6; with --data: keep this many training cases)")
    compare.add_argument("--n-held-out", type=int, default=2, help="held-out cases (default: 2)")
    compare.add_argument("--phantom-shape", type=int, nargs=3, default=[128, 128, 32], metavar=("X", "Y", "Z"))
    compare.add_argument("--card", default="phantom", help="concept card of the data (default: phantom)")
    compare.add_argument("--settings", default="text,manual", help="text, manual or both (default: text,manual)")
    compare.add_argument("--steps", type=int, default=200, help="optimisation steps, every method (default: 200)")
    compare.add_argument("--slices-per-step", type=int, default=2, help="labelled slices per step (default: 2)")
    compare.add_argument("--seed", type=int, default=0, help="training seed, every method")
    compare.add_argument("--data-seed", type=int, default=0, help="phantoms and labelled/unlabelled split")
    _add_sam_options(compare, "of the SAM-based methods")
    compare.add_argument("--method-options", help='JSON: method name -> build options, e.g. \'{"sam3": '
                         '{"checkpoint": "sam3.pt"}}\'')
    _add_frame_options(compare)
    compare.add_argument("--device", default="auto", help="auto, cpu or cuda")
    compare.add_argument("--overwrite", action="store_true", help="replace the tables of an earlier run")
    compare.add_argument("--quiet", action="store_true")
    compare.set_defaults(run=_compare)

    add_segment_command(commands)
    return parser


def _hide_library_noise() -> None:
    """Hide library warnings that tell a user nothing (deprecations inside timm, an optional GPU decoder MONAI did
    not find), unless warnings were asked for with python -W."""
    if sys.warnoptions:
        return
    for message, category in _LIBRARY_NOISE:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def _quiet_progress_bars() -> None:
    """--quiet: no Hugging Face progress bars ("Loading weights"); transformers, imported later, takes the switch."""
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()


def main(argv: list[str] | None = None) -> int:
    """Entry point; project errors become one clear line and exit code 2, Ctrl-C or SIGTERM at any time one line
    and exit code 130 (`segment` also writes its summary)."""
    _hide_library_noise()
    tune_allocator()
    with interrupts_raised():
        try:
            args = build_parser().parse_args(argv)
            if getattr(args, "quiet", False):
                _quiet_progress_bars()
            return args.run(args)
        except MedClipSamError as error:
            print(f"medclipsam: error: {error}", file=sys.stderr)
            return exit_codes.NOTHING_RAN
        except BaseException as error:
            if not caused_by_interrupt(error):
                raise
            print("medclipsam: interrupted", file=sys.stderr)
            return exit_codes.INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
