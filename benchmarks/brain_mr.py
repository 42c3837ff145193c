"""Text-only brain MR, real scans: CLIP-Guided SAM trained on one real T1 MR (Colin27 with the AAL atlas on its grid)
to find ten large regions by name (frontal, parietal, temporal, occipital lobes and cerebellum, each side), then tested
on another brain, the MNI152 2009a template (nilearn, offline), with AAL resampled onto it in world space (nearest
neighbour). The reference on MNI152 is approximate: AAL was drawn on Colin27, and the two brains are only aligned in
MNI space, not segmented. Prints and writes a Markdown table.

The MNI152 template nilearn ships is brain-extracted, so by default the model trains on Colin27 brain-extracted too
(`ch2bet.nii.gz`); `--training-image ch2` trains on the whole head instead (scalp and skull the test brain lacks).

Needs: `apt-get install mricron-data` (Colin27 and AAL in /usr/share/mricron/templates) and `pip install nilearn`.

    python benchmarks/brain_mr.py [--steps 200] [--similarity-steps 2000] [--training-image ch2bet]
                                  [--out benchmarks/results/brain_mr.md]
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from medclipsam.atomic import atomic_write
from medclipsam.data.augment import AugmentSettings
from medclipsam.data.concepts import load_card
from medclipsam.data.frame import FrameSettings
from medclipsam.experiments.real_scans import dice
from medclipsam.inference.predictor import Predictor
from medclipsam.models.factory import create_model
from medclipsam.runtime import tune_allocator
from medclipsam.training.loop import TrainBudget
from medclipsam.training.pipeline import train_on_datalist

TEMPLATES = Path("/usr/share/mricron/templates")
LOBES = {"frontal lobe": "Frontal_", "parietal lobe": "Parietal_", "temporal lobe": "Temporal_",
         "occipital lobe": "Occipital_", "cerebellum": "Cerebelum_"}
SIDES = {"L": "left", "R": "right"}


def region_map(aal: np.ndarray) -> tuple[np.ndarray, dict[int, str]]:
    """AAL's labels grouped into the ten regions (1..10), and their names."""
    names = {}
    lookup = np.zeros(int(aal.max()) + 1, dtype=np.int16)
    regions = [f"{SIDES[side]} {lobe}" for lobe in LOBES for side in SIDES]
    for line in (TEMPLATES / "aal.nii.txt").read_text().splitlines():
        parts = line.split()
        if len(parts) < 2:
            continue
        value, name = int(parts[0]), parts[1]
        for lobe, prefix in LOBES.items():
            side = name.rsplit("_", 1)[-1]
            if name.startswith(prefix) and side in SIDES and value < len(lookup):
                lookup[value] = regions.index(f"{SIDES[side]} {lobe}") + 1
    names = {i + 1: region for i, region in enumerate(regions)}
    return lookup[aal.astype(np.int64)], names


def card_yaml(names: dict[int, str]) -> str:
    labels = "\n".join(f"  {value}: {{name: {name}}}" for value, name in names.items())
    return (f"name: brain_lobes\ntitle: ten AAL regions grouped by lobe\nsource: AAL atlas on Colin27 (mricron-data)\n"
            f"licence: BSD-3 (mricron-data)\nmodality: MR\nlabels:\n{labels}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--similarity-steps", type=int, default=2000)
    parser.add_argument("--augment-views", type=int, default=3)
    parser.add_argument("--training-image", choices=("ch2bet", "ch2"), default="ch2bet",
                        help="Colin27 brain-extracted (default, as the MNI152 test template is) or the whole head")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "brain_mr.md"))
    args = parser.parse_args()
    tune_allocator()  # as the CLI does
    from nilearn import datasets, image

    colin, aal = nib.load(TEMPLATES / f"{args.training_image}.nii.gz"), nib.load(TEMPLATES / "aal.nii.gz")
    regions, names = region_map(np.asarray(aal.dataobj))
    mni = datasets.load_mni152_template(resolution=2)
    mni_aal = image.resample_to_img(aal, mni, interpolation="nearest", force_resample=True, copy_header=True)
    mni_regions, _ = region_map(np.asarray(mni_aal.dataobj))
    frame = FrameSettings(size=256, field_of_view_mm=256.0, slice_spacing_mm=3.0, modality="MR", window=None)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        nib.save(nib.Nifti1Image(np.asarray(colin.dataobj).astype(np.float32), colin.affine), folder / "colin.nii.gz")
        nib.save(nib.Nifti1Image(regions, aal.affine), folder / "colin_lobes.nii.gz")
        nib.save(nib.Nifti1Image(np.asarray(mni.dataobj).astype(np.float32), mni.affine), folder / "mni.nii.gz")
        (folder / "card.yaml").write_text(card_yaml(names))
        card = load_card(folder / "card.yaml")
        start = time.perf_counter()
        model_dir = train_on_datalist(
            "clip_guided_sam", {"model_options": {}, "train_options": {"similarity_steps": args.similarity_steps}},
            [{"image": str(folder / "colin.nii.gz"), "label": str(folder / "colin_lobes.nii.gz"), "case_id": "colin"}],
            card, folder / "run", frame, budget=TrainBudget(steps=args.steps, seed=0),
            augment=AugmentSettings(views=args.augment_views), slice_step=2,
            progress=lambda line: print(line, flush=True))
        seconds = time.perf_counter() - start
        predictor = Predictor(create_model(model_dir), device="auto", runtime="auto")  # as `medclipsam segment`
        rows = []
        for name, path, truth in (("Colin27 (training scan)", folder / "colin.nii.gz", regions),
                                  ("MNI152 2009a (another brain)", folder / "mni.nii.gz", mni_regions)):
            predictor.set_volume(path)
            result = predictor.predict(list(names.values()))
            rows.append((name, [dice(result.mask(region), truth == value) for value, region in names.items()]))
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    header = "| scan | " + " | ".join(names.values()) + " | mean |"
    lines = [f"# Text-only brain MR ({machine}; training {seconds:.0f} s; {json.dumps(vars(args))})", "", header,
             "|---|" + "---|" * (len(names) + 1)]
    lines += [f"| {name} | " + " | ".join(f"{s:.3f}" for s in scores) + f" | **{np.mean(scores):.3f}** |"
              for name, scores in rows]
    text = "\n".join(lines) + "\n"
    atomic_write(Path(args.out), lambda temp: Path(temp).write_text(text, encoding="utf-8"))
    print(text)


if __name__ == "__main__":
    main()
