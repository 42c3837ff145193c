"""Real-scan figures for the README (the real abdominal CT of data/real_ct_abdomen; one subject, so these measure
geometry invariance and manual mode, not generalisation to other patients):

1. the model (default: the shipped one) on the CT's own grid, re-gridded as a 512 x 512, 0.8 mm, 410 mm field of
   view with a table, and in 6 mm slices: Dice per organ, text-only and with each organ's reference 3D box;
2. manual mode vs the bare LiteMedSAM it wraps (the model untrained), the same reference 3D box alone on every
   labelled structure.

    python benchmarks/real_scans.py [--model FOLDER] [--skip-manual] [--text-only] [--own-grid-only] [--tta]
                                    [--out FILE.md]

`--tta`: the text-only rows also with test-time augmentation (`segment --tta`: five views of each slice averaged).
"""
from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from medclipsam.atomic import atomic_write
from medclipsam.data.concepts import load_card
from medclipsam.experiments.real_scans import Scan, dice, manual_vs_backbone, regrid, truth_boxes
from medclipsam.inference.predictor import Predictor
from medclipsam.models.factory import create_model
from medclipsam.runtime import tune_allocator

REAL_CT = Path(__file__).resolve().parents[1] / "data" / "real_ct_abdomen"
ORGANS = ["liver", "spleen", "right kidney", "left kidney", "aorta", "stomach", "pancreas", "inferior vena cava",
          "gallbladder"]
OWN_GRID = "own grid (3 mm, 366 x 303 mm)"


def load_real_ct() -> Scan:
    image, label = (nib.load(REAL_CT / name) for name in ("ct.nii.gz", "labels.nii.gz"))
    return Scan(np.asarray(image.dataobj).astype(np.int16), np.asarray(label.dataobj).astype(np.int16), image.affine)


def grids(scan: Scan) -> dict[str, Scan]:
    spacing = np.linalg.norm(scan.affine[:3, :3], axis=0)
    return {OWN_GRID: scan,
            "512 x 512, 0.8 mm, table": regrid(scan, (0.8, 0.8, spacing[2]), (512, 512, scan.image.shape[2]),
                                               offset_mm=(20.0, -15.0)),
            "6 mm slices": regrid(scan, (spacing[0], spacing[1], 6.0),
                                  (*scan.image.shape[:2], scan.image.shape[2] // 2), table_hu=None)}


def organ_table(predictor: Predictor, scans: dict[str, Scan], folder: Path,
                settings: tuple[str, ...] = ("text-only", "3D boxes")) -> str:
    card = load_card("totalsegmentator")
    values = {organ: card.resolve(organ).label_id for organ in ORGANS}
    lines = ["| grid | setting | " + " | ".join(ORGANS) + " | mean | s |", "|---|---|" + "---|" * (len(ORGANS) + 2)]
    for name, scan in scans.items():
        path = folder / f"{len(lines)}.nii.gz"
        nib.save(nib.Nifti1Image(scan.image, scan.affine), path)
        predictor.set_volume(path)
        for setting in settings:
            start = time.perf_counter()
            predictor.test_time_augmentation = setting == "text-only, five views"
            boxes = truth_boxes(scan.label, values) if setting == "3D boxes" else None
            result = predictor.predict(ORGANS, boxes=boxes)
            scores = [dice(result.mask(o), scan.label == values[o]) for o in ORGANS]
            lines.append(f"| {name} | {setting} | " + " | ".join(f"{s:.3f}" for s in scores) +
                         f" | **{np.mean(scores):.3f}** | {time.perf_counter() - start:.0f} |")
            print(lines[-1], flush=True)
    return "\n".join(lines)


def manual_table(predictor: Predictor, scan: Scan, folder: Path) -> str:
    card = load_card("totalsegmentator")
    values = {card.by_id(v).name: int(v) for v in np.unique(scan.label) if v}
    path = folder / "manual.nii.gz"
    nib.save(nib.Nifti1Image(scan.image, scan.affine), path)
    rows = [(name, *scores) for name, scores in manual_vs_backbone(predictor, path, scan.label, values).items()]
    worse = [r for r in rows if r[1] < r[2] - 0.01]
    lines = [f"{len(rows)} structures; medclipsam manual mean Dice {np.mean([r[1] for r in rows]):.3f}, bare "
             f"LiteMedSAM {np.mean([r[2] for r in rows]):.3f}; structures below the backbone by more than 0.01: "
             f"{len(worse)}", "", "| structure | medclipsam (manual) | bare LiteMedSAM | difference |",
             "|---|---|---|---|"]
    lines += [f"| {n} | {a:.3f} | {b:.3f} | {a - b:+.3f} |" for n, a, b in sorted(rows, key=lambda r: r[1] - r[2])]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="model folder (default: the shipped model)")
    parser.add_argument("--skip-manual", action="store_true", help="only the grid table")
    parser.add_argument("--text-only", action="store_true",
                        help="grid rows by name only (the 3D-box rows are the pristine backbone's for every model)")
    parser.add_argument("--own-grid-only", action="store_true", help="the CT's own grid only, not the re-gridded ones")
    parser.add_argument("--tta", action="store_true", help="text-only rows with test-time augmentation as well")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "real_scans.md"))
    args = parser.parse_args()
    tune_allocator()  # as the CLI does
    scan = load_real_ct()
    predictor = Predictor(create_model(args.model), device="auto", runtime="auto")  # as `medclipsam segment`
    machine = (f"{torch.cuda.get_device_name()}" if torch.cuda.is_available() else
               f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    scans = {OWN_GRID: scan} if args.own_grid_only else grids(scan)
    settings = ("text-only",) + (("text-only, five views",) if args.tta else ())
    settings += () if args.text_only else ("3D boxes",)
    with tempfile.TemporaryDirectory() as tmp:
        sections = [f"# Real CT (data/real_ct_abdomen), model {args.model}, {machine}", "",
                    "Dice per organ on the same patient (the model saw this patient in training):", "",
                    organ_table(predictor, scans, Path(tmp), settings)]
        if not args.skip_manual:
            sections += ["", "## Manual mode vs the bare backbone (same reference 3D box per structure)", "",
                         manual_table(predictor, scan, Path(tmp))]
    text = "\n".join(sections) + "\n"
    atomic_write(Path(args.out), lambda temp: Path(temp).write_text(text, encoding="utf-8"))
    print(text)


if __name__ == "__main__":
    main()
