"""The shipped text-only model: its Dice re-checked on fresh phantoms, and the demo's outputs (geometry, report)."""
import json

import nibabel as nib
import numpy as np
import pytest

from medclipsam.data.concepts import load_card
from medclipsam.data.phantom import make_phantom
from medclipsam.data.slices import load_case, slice_items
from medclipsam.eval.slice_dice import pooled_slice_dice
from medclipsam.inference.text_demo import run_text_demo
from medclipsam.models.default import default_model_path, load_default_model

LARGE_ORGANS = ["liver", "spleen", "right kidney", "left kidney", "aorta", "stomach"]


@pytest.fixture(scope="module")
def model():
    return load_default_model()


def test_shipped_model_is_small_and_text_only(model):
    assert sum(f.stat().st_size for f in default_model_path().iterdir()) < 12 * 2**20
    assert model.config.sam == "litemedsam" and model.config.vision_language == "minilm"
    assert model.config.text_only_prompt == "box"


def test_shipped_model_dice_on_fresh_phantoms(model, tmp_path):
    items = []
    for seed in (900, 901):
        make_phantom(seed).to_nifti(tmp_path / f"ct{seed}.nii.gz", tmp_path / f"lab{seed}.nii.gz")
        case = load_case({"image": str(tmp_path / f"ct{seed}.nii.gz"), "label": str(tmp_path / f"lab{seed}.nii.gz")})
        items += slice_items(case, load_card("phantom"), empty_ratio=0, absent_per_slice=0, slice_step=6, seed=seed)
    dice = pooled_slice_dice(model, items, LARGE_ORGANS)
    assert sum(dice.values()) / len(dice) >= 0.85, dice


def test_demo_writes_an_overlaying_mask_and_a_consistent_report(tmp_path):
    rows = run_text_demo(tmp_path, seed=501, progress=lambda _m: None, shape=(96, 96, 12))
    scan, mask = nib.load(tmp_path / "phantom_ct.nii.gz"), nib.load(tmp_path / "phantom_ct_mask.nii.gz")
    assert mask.shape == scan.shape and np.allclose(mask.affine, scan.affine)
    labels = np.asarray(mask.dataobj)
    report = json.loads((tmp_path / "report.json").read_text())
    voxel_ml = float(np.prod(scan.header.get_zooms()[:3])) / 1000
    card = load_card("phantom")
    for row in report:
        label_id = card.resolve(row["concept"]).label_id
        assert row["voxels"] == int((labels == label_id).sum())
        assert row["volume_ml"] == pytest.approx(row["voxels"] * voxel_ml, abs=1e-3)
    assert (tmp_path / "overlay.png").stat().st_size > 10_000
    liver = next(r for r in rows if r["concept"] == "liver")
    assert liver["dice"] > 0.8
