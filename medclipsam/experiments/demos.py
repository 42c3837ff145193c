"""The embedded demo: every organ of a fresh CT phantom segmented by its name with the shipped model, through
`medclipsam segment`'s own code (loading, RAS, the model's frame and window, encoding shared by every organ, clean-up,
a label map in the scan's geometry, report, preview), then scored against the phantom's truth.

`oracle_boxes` prompts each organ with its 3D box from the truth instead (manual mode: the pristine backbone answers
boxes), a check of the weights and the geometry. No download, no GPU.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np

from medclipsam.data.concepts import load_card
from medclipsam.data.phantom import make_phantom
from medclipsam.errors import MedClipSamError
from medclipsam.eval.evaluate import truth_boxes
from medclipsam.eval.metrics import evaluate_case, write_table
from medclipsam.inference.batch import SegmentOptions, run_batch

DEMO_SEED = 500  # far from the seeds of the phantoms the shipped model was trained on
DEMO_SHAPE = (128, 128, 16)  # 16 slices of 12 mm over the phantom's full 192 mm: the demo stays within 2 minutes
DEMO_SPACING = (3.0, 3.0, 12.0)


def run_demo(out_dir: str | Path, seed: int = DEMO_SEED, overwrite: bool = False, quiet: bool = False,
             model: str | None = None, oracle_boxes: bool = False,
             progress: Callable[[str], None] = print, test_time_augmentation: bool = False) -> list[dict]:
    """Make a phantom, segment each organ (by name, or by its truth box), write the scan, its truth, the segment
    outputs and metrics.csv under `out_dir`; return the per-organ metric rows."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    image_path, truth_path = out / "phantom_ct.nii.gz", out / "phantom_truth.nii.gz"
    phantom = make_phantom(seed, shape=DEMO_SHAPE, spacing=DEMO_SPACING)
    phantom.to_nifti(image_path, truth_path, overwrite=overwrite)
    card = load_card("phantom")
    boxes = []
    if oracle_boxes:  # the phantom is stored in RAS, so its voxel indices are the RAS volume's
        for concept, box in truth_boxes(phantom.label, card, card.names()).items():
            boxes.append(f"{concept}=" + ",".join(str(v) for v in box))
    segmentation = out / "segmentation"
    code = run_batch(SegmentOptions(inputs=[str(image_path)], prompts=card.names(), out=segmentation, model=model,
                                    boxes=boxes, preview=True, overwrite=overwrite, quiet=quiet,
                                    test_time_augmentation=test_time_augmentation))
    labels_path = segmentation / "phantom_ct" / "labels.nii.gz"
    if code != 0 or not labels_path.is_file():
        raise MedClipSamError(f"the demo's segmentation failed (exit code {code}); see {segmentation / 'summary.json'}")
    truth = nib.load(truth_path)
    predicted = np.asarray(nib.load(labels_path).dataobj)
    spacing = tuple(float(s) for s in truth.header.get_zooms()[:3])
    mode = "truth boxes" if oracle_boxes else "text-only"
    mode += ", test-time augmentation" if test_time_augmentation and not oracle_boxes else ""
    method = f"clip_guided_sam ({mode}, {model or 'shipped model'})"
    rows = evaluate_case(predicted, np.asarray(truth.dataobj), spacing, card.label_map(), case_id=f"phantom_{seed}",
                         method=method)
    write_table(rows, out / "metrics.csv", overwrite=True)
    progress(f"wrote {labels_path.parent} (labels.nii.gz, report.json/csv, preview.png) and {out / 'metrics.csv'}")
    return rows


def format_rows(rows: list[dict]) -> str:
    """A small text table of Dice / HD95 per organ and the mean Dice."""
    lines = [f"{'organ':<24} {'dice':>6} {'hd95 mm':>8}"]
    lines += [f"{r['concept']:<24} {r['dice']:>6.3f} {r['hd95']:>8.1f}" for r in rows]
    lines.append(f"{'mean':<24} {float(np.mean([r['dice'] for r in rows])):>6.3f}")
    return "\n".join(lines)
