"""Speed and memory of each method per SAM backbone: per-slice latency, slices/s at the best batch size, seconds for a
300-slice 512 x 512 CT with 1 and with 5 organs, peak memory (RSS on CPU, torch.cuda.max_memory_allocated on CUDA),
trainable / total parameters, and the cost relative to one bare encoder pass per slice (same process, same slices).

Each (method, backbone) runs in a fresh process. Prints a Markdown table and writes speed_memory.csv / .md under
--out-dir. On CPU, segment fewer slices (--slices) and the CT seconds are extrapolated per slice (the table says
which). SAM ViT backbones without a checkpoint are timed with random weights (same cost). See
`medclipsam.experiments.speed_memory` for what is timed and how.

    python benchmarks/speed_memory.py                                   # every method, litemedsam, device auto
    python benchmarks/speed_memory.py --slices 4 --batch-sizes 1 2 --repeats 1    # a quick CPU run
    python benchmarks/speed_memory.py --methods clip_guided_sam --backbones vit_b --append
"""
from __future__ import annotations

import argparse
import csv
import shlex
import sys
import time
import traceback
from pathlib import Path

from medclipsam.atomic import atomic_write
from medclipsam.eval.metrics import write_table
from medclipsam.experiments.speed_memory import BACKBONE_METHODS, SpeedConfig, format_table, measure, measure_isolated
from medclipsam.models.factory import available_methods

DEFAULT_METHODS = ("clip_guided_sam", "sam_lora", "two_stage", "esc_net", "supervised_unet", "mean_teacher",
                   "intensity_threshold")
COUNTS = ("latency_batch", "best_batch", "slices_measured", "volume_slices", "trainable_params", "total_params")
NUMERIC = ("latency_ms", "slices_per_s", "encoder_ms_per_slice", "peak_memory_mb", "start_memory_mb")


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=[m for m in DEFAULT_METHODS if m in available_methods()],
                        help="registered method names (default: every one with a runtime cost)")
    parser.add_argument("--backbones", nargs="+", default=["litemedsam"],
                        help="SAM backbones for the SAM-based methods: litemedsam, vit_b, vit_l, vit_h, medsam "
                             "(ViTs with random weights), tiny_vit, tiny_tinyvit")
    parser.add_argument("--setting", default="text", choices=["text", "manual"])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--slices", type=int, default=300, help="slices actually segmented")
    parser.add_argument("--target-slices", type=int, default=300, help="slices of the CT reported")
    parser.add_argument("--size", type=int, default=512, help="in-plane size of the CT")
    parser.add_argument("--organs", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--adapter-blocks", default="last1", help="CLIP-Guided SAM's adapted blocks")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per batch size (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls first")
    parser.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                        help="wall time, or process CPU time (CPU runs on a shared machine, one thread)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's choice)")
    parser.add_argument("--in-process", action="store_true",
                        help="measure in this process (peak memory is then the whole run's)")
    parser.add_argument("--append", action="store_true", help="keep the rows already in the CSV (others replaced)")
    parser.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    return parser.parse_args()


def previous_rows(path: Path) -> list[dict]:
    """Rows of an earlier CSV, numbers parsed back."""
    if not path.is_file():
        return []
    with path.open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        for key, value in row.items():
            if value and key in COUNTS:
                row[key] = int(float(value))
            elif value and (key in NUMERIC or key.startswith(("volume_s_", "x_encoder_"))):
                row[key] = float(value)
    return rows


LEGEND = """
- latency: one `predict` call on one slice at the model's input size (256 LiteMedSAM, 1024 SAM ViT), one organ.
- slices/s: the best over the batch sizes tried (one organ).
- CT s: the predictor on the whole CT (the model's frame, encoding, prediction, mapping back to the scan's grid, 3D
  clean-up) at the best batch size; "extrapolated from N slices" = seconds for the central N slices x (CT slices / N).
- encoder ms/slice: one pass of a fresh, bare copy of the backbone's image encoder on the same slices, same batch.
- x encoder: CT seconds per slice / encoder seconds per slice (1 = the cost of the encoder alone).
- peak memory: peak RSS of the process that measured the row ("before building": that process after its imports);
  on CUDA, torch.cuda.max_memory_allocated. Peak memory is that of the slices actually segmented.
- clock "cpu": process CPU seconds, one thread (what a dedicated core takes: the machine was shared); "wall": wall time.
"""


def results_text(rows: list[dict], args: argparse.Namespace) -> str:
    """The Markdown results: what was run, the table, how to read it."""
    commands = "; ".join(f"`{c}`" for c in dict.fromkeys(row["command"] for row in rows))
    return (f"Speed and memory ({time.strftime('%Y-%m-%d')}; {commands}). CT: a phantom resampled to "
            f"{args.size} x {args.size} x {args.target_slices}, {args.setting} setting"
            f"{', every organ found on every slice (worst case)' if args.setting == 'text' else ''}; "
            "untrained weights (timing does not depend on them).\n\n" + format_table(rows, tuple(args.organs))
            + "\n" + LEGEND)


def main() -> None:
    """Measure every (method, backbone) asked for, print the table and write it as CSV and Markdown."""
    args = parse_args()
    configs = [SpeedConfig(method=method, backbone=backbone if method in BACKBONE_METHODS else None,
                           setting=args.setting, batch_sizes=tuple(args.batch_sizes), slices=args.slices,
                           target_slices=args.target_slices, size=args.size, organs=tuple(args.organs),
                           adapter_blocks=args.adapter_blocks, repeats=args.repeats, warmup=args.warmup,
                           clock=args.clock, device=args.device, threads=args.threads)
               for backbone in args.backbones for method in args.methods
               if method in BACKBONE_METHODS or backbone == args.backbones[0]]
    command = "python benchmarks/speed_memory.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    rows = []
    for config in configs:
        start = time.perf_counter()
        try:
            row = measure(config) if args.in_process else measure_isolated(config)
        except Exception as error:  # one method failing must not lose the others' figures; the table says why
            traceback.print_exc()
            row = {"method": config.method, "backbone": config.backbone or "-", "setting": config.setting,
                   "device": "", "precision": "", "note": f"failed: {type(error).__name__}: {error}"}
        rows.append({**row, "command": command})
        print(f"{config.method} on {config.backbone or '-'}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    key = lambda row: (row["method"], row["backbone"], row["setting"], row["device"])  # noqa: E731
    if args.append:
        fresh = {key(row) for row in rows}
        rows = [row for row in previous_rows(out / "speed_memory.csv") if key(row) not in fresh] + rows
    text = results_text(rows, args)
    print(text)
    write_table(rows, out / "speed_memory.csv", overwrite=True)
    atomic_write(out / "speed_memory.md", lambda temp: Path(temp).write_text(text, encoding="utf-8"))


if __name__ == "__main__":
    main()
