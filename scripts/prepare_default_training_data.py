"""Write the datalist the shipped default model trains on: the real abdominal CT of data/real_ct_abdomen (its
TotalSegmentator labels, read through the phantom card's nine organs by `medclipsam train`) and scanner-like CT
phantoms (512 matrix, 0.6-1 mm pixels, 0.6-5 mm slices, table, arms, off-centre patients, contrast phases).

Usage: python scripts/prepare_default_training_data.py OUT [--phantoms 6] [--seed 0]
Then:  medclipsam train --datalist OUT/dataset.json --card phantom ...   (the README's default-model command)
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from medclipsam.atomic import atomic_write
from medclipsam.data.phantom import write_phantom_dataset

REAL_CT = Path(__file__).resolve().parents[1] / "data" / "real_ct_abdomen"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="folder for the phantoms and dataset.json")
    parser.add_argument("--phantoms", type=int, default=6, help="scanner-like phantoms (default: 6)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first phantom (default: 0)")
    args = parser.parse_args()
    out = Path(args.out)
    phantoms = json.loads(write_phantom_dataset(out / "phantoms", args.phantoms, seed=args.seed,
                                                scanner=True).read_text(encoding="utf-8"))
    training = [{"image": str((out / "phantoms" / e["image"]).resolve()),
                 "label": str((out / "phantoms" / e["label"]).resolve())} for e in phantoms["training"]]
    training.append({"image": str(REAL_CT / "ct.nii.gz"), "label": str(REAL_CT / "labels.nii.gz"),
                     "card": "totalsegmentator"})
    datalist = {"name": "medclipsam default model", "description": f"{args.phantoms} scanner-like CT phantoms "
                f"(seeds {args.seed}..{args.seed + args.phantoms - 1}) and one real abdominal CT (TotalSegmentator "
                "labels, read through the training card by concept name)", "training": training}
    text = json.dumps(datalist, indent=2) + "\n"
    atomic_write(out / "dataset.json", lambda temp: Path(temp).write_text(text, encoding="utf-8"))
    print(out / "dataset.json")


if __name__ == "__main__":
    main()
