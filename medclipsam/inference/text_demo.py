"""Embedded demo: text-only segmentation of every organ of a fresh CT phantom with the shipped default model.

The phantom is written as NIfTI like a real scan and read back through the same path a real run uses (RAS, CT window,
slicing, a shared encoder trunk per slice batch, reassembly, a label map in the scan's own geometry), then scored
against the phantom's truth. The shipped model was trained on phantoms only: real scans need a model trained on
real data (`medclipsam train`).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from monai.data import MetaTensor

from medclipsam.data.concepts import load_card
from medclipsam.data.io import save_mask
from medclipsam.data.phantom import DEFAULT_SHAPE, make_phantom
from medclipsam.data.slices import load_case
from medclipsam.eval.metrics import evaluate_case, write_table
from medclipsam.inference.preview import overlay_png
from medclipsam.inference.report import volume_report, write_report
from medclipsam.models.default import load_default_model

DEMO_SEED = 500  # far from the training phantoms' seeds (0..7)


def run_text_demo(out_dir: str | Path, seed: int = DEMO_SEED, overwrite: bool = False,
                  progress: Callable[[str], None] = print, shape: tuple[int, int, int] = DEFAULT_SHAPE) -> list[dict]:
    """Make a phantom, segment each organ by name, write NIfTI + report + overlay PNG + metrics; return metric rows."""
    start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    phantom = make_phantom(seed, shape=shape)
    image_path, truth_path = out / "phantom_ct.nii.gz", out / "phantom_truth.nii.gz"
    phantom.to_nifti(image_path, truth_path, overwrite=overwrite)
    card = load_card("phantom")
    case = load_case({"image": str(image_path), "label": str(truth_path)})
    model = load_default_model()
    progress(f"segmenting {len(card.names())} organs by name on {case['image'].shape[-1]} slices")
    result = model.segment(case["image"], card.names(),
                           progress=lambda done, total: progress(f"slices {done}/{total}"))
    labels = result.labels.numpy()
    by_card = np.zeros_like(labels)
    for concept, value in result.label_values.items():
        by_card[labels == value] = card.resolve(concept).label_id
    ras_labels = MetaTensor(torch.as_tensor(by_card)[None], affine=case["image"].affine)  # RAS, for the write-back
    mask_path = save_mask(ras_labels, like=str(image_path), path=out / "phantom_ct_mask.nii.gz", overwrite=overwrite)
    spacing = tuple(float(s) for s in case["image"].pixdim[:3])
    write_report(volume_report(result, spacing), out / "report.json", out / "report.csv")
    overlay_png(case["image"], ras_labels.as_tensor(), card.label_map(), out / "overlay.png")
    rows = evaluate_case(by_card, case["label"][0].numpy(), spacing, card.label_map(), case_id=f"phantom_{seed}",
                         method="clip_guided_sam (text-only, shipped model)")
    write_table(rows, out / "metrics.csv", overwrite=True)
    progress(f"wrote {mask_path}, report.json/csv, overlay.png and metrics.csv in {time.perf_counter() - start:.0f} s")
    return rows
