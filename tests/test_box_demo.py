"""LiteMedSAM's real weights with truth boxes on phantom slices, and the demo's geometry."""
import numpy as np
import torch

from medclipsam.data.concepts import load_card
from medclipsam.data.phantom import make_phantom
from medclipsam.data.slices import load_case, slice_items
from medclipsam.inference.box_demo import segment_slice_with_boxes
from medclipsam.models.sam import build_sam_backbone
from medclipsam.training.prompt_simulation import mask_box


def test_mask_box_is_tight():
    mask = torch.zeros(10, 12)
    mask[2:5, 3:9] = 1
    assert mask_box(mask).tolist() == [3.0, 2.0, 8.0, 4.0]


def test_litemedsam_with_truth_boxes_on_phantom_slices(tmp_path):
    phantom = make_phantom(3)
    phantom.to_nifti(tmp_path / "ct.nii.gz", tmp_path / "label.nii.gz")
    case = load_case({"image": str(tmp_path / "ct.nii.gz"), "label": str(tmp_path / "label.nii.gz")})
    items = slice_items(case, load_card("phantom"), size=256, empty_ratio=0.0, absent_per_slice=0, slice_step=4)
    items = sorted(items, key=lambda item: -len(item["concepts"]))
    backbone = build_sam_backbone("litemedsam").eval()
    dices = []
    for item in items[:3]:
        boxes = torch.stack([mask_box(m) for m in item["masks"]])
        pred = segment_slice_with_boxes(backbone, item["image"], boxes) > 0
        truth = item["masks"] > 0.5
        inter = (pred & truth).sum((1, 2)).float()
        dice = 2 * inter / (pred.sum((1, 2)) + truth.sum((1, 2)))
        dices += dice[truth.sum((1, 2)) >= 400].tolist()  # organs at least ~10 voxels across in the slice
    assert len(dices) >= 6
    assert float(np.mean(dices)) >= 0.85
