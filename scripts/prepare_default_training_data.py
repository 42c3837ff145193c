"""Write the datalist the shipped default model trains on: the real abdominal CT of data/real_ct_abdomen (its
TotalSegmentator labels, read through the phantom card's nine organs by `medclipsam train`) and scanner-like CT
phantoms (512 matrix, 0.6-1 mm pixels, 0.6-5 mm slices, table, arms, off-centre patients, contrast phases); with
--thick N also classic phantoms with thick slices (3 mm pixels; 12, 6, 8 or 4 mm slices, each the average over its
slab as a scanner makes it), so that the model sees thick slices' partial volume (4, as for the shipped model).

Usage: python scripts/prepare_default_training_data.py OUT [--phantoms 6] [--thick 4] [--seed 0]
Then:  medclipsam train --datalist OUT/dataset.json --card phantom ...   (the README's default-model command)
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from medclipsam.atomic import atomic_write
from medclipsam.data.phantom import make_phantom, write_phantom_dataset

REAL_CT = Path(__file__).resolve().parents[1] / "data" / "real_ct_abdomen"
THICK_SEED = 100  # thick-slice classic phantoms: seeds 100, 101, ... (the demo's phantom is seed 500)
THICK_SLICES_MM = (12.0, 6.0, 8.0, 4.0)  # cycled; 3 mm pixels, 128 x 128, 192 mm along z
PHANTOM_LENGTH_MM = 192.0


def write_thick_phantoms(out: Path, count: int) -> list[dict]:
    """`count` classic phantoms with thick slices under `out`; their datalist entries (absolute paths)."""
    entries = []
    for i in range(count):
        thickness = THICK_SLICES_MM[i % len(THICK_SLICES_MM)]
        phantom = make_phantom(THICK_SEED + i, shape=(128, 128, round(PHANTOM_LENGTH_MM / thickness)),
                               spacing=(3.0, 3.0, thickness))
        image, label = out / "imagesTr" / f"thick_{i:03d}.nii.gz", out / "labelsTr" / f"thick_{i:03d}.nii.gz"
        image.parent.mkdir(parents=True, exist_ok=True)
        label.parent.mkdir(parents=True, exist_ok=True)
        phantom.to_nifti(image, label, overwrite=True)
        entries.append({"image": str(image.resolve()), "label": str(label.resolve())})
    return entries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="folder for the phantoms and dataset.json")
    parser.add_argument("--phantoms", type=int, default=6, help="scanner-like phantoms (default: 6)")
    parser.add_argument("--thick", type=int, default=4,
                        help="thick-slice classic phantoms (default: 4, as for the shipped model)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first phantom (default: 0)")
    args = parser.parse_args()
    out = Path(args.out)
    phantoms = json.loads(write_phantom_dataset(out / "phantoms", args.phantoms, seed=args.seed,
                                                scanner=True).read_text(encoding="utf-8"))
    training = [{"image": str((out / "phantoms" / e["image"]).resolve()),
                 "label": str((out / "phantoms" / e["label"]).resolve())} for e in phantoms["training"]]
    training += write_thick_phantoms(out / "thick_phantoms", args.thick)
    training.append({"image": str(REAL_CT / "ct.nii.gz"), "label": str(REAL_CT / "labels.nii.gz"),
                     "card": "totalsegmentator"})
    description = (f"{args.phantoms} scanner-like CT phantoms (seeds {args.seed}..{args.seed + args.phantoms - 1}), "
                   f"{args.thick} thick-slice classic phantoms (seeds {THICK_SEED}..{THICK_SEED + args.thick - 1}) "
                   "and one real abdominal CT (TotalSegmentator labels, read through the training card by concept "
                   "name)")
    datalist = {"name": "medclipsam default model", "description": description, "training": training}
    text = json.dumps(datalist, indent=2) + "\n"
    atomic_write(out / "dataset.json", lambda temp: Path(temp).write_text(text, encoding="utf-8"))
    print(out / "dataset.json")


if __name__ == "__main__":
    main()
