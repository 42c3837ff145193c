"""The real abdominal CT of data/real_ct_abdomen (one subject, TotalSegmentator labels; the shipped model trained on
it, so these are tests of geometry and of manual mode, never of generalisation):
- the same anatomy re-gridded as other scanners would acquire it (512 x 512 at 0.8 mm with a table around it; 5 mm
  slices) is segmented as well as on its own grid, by name and with boxes (Dice drop <= 0.03);
- with a reference box, manual mode is at least the bare (untrained) LiteMedSAM, minus 0.01, on every labelled
  structure of the slab."""
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medclipsam.data.concepts import load_card
from medclipsam.data.datalists import load_datalist
from medclipsam.experiments.real_scans import (Scan, dice, fast_vs_every_slice, manual_vs_backbone, regrid,
                                                truth_boxes)
from medclipsam.inference.predictor import Predictor
from medclipsam.models.factory import create_model

REAL_CT = Path(__file__).resolve().parents[1] / "data" / "real_ct_abdomen"
ORGANS = ["liver", "spleen", "right kidney", "left kidney", "aorta", "stomach"]
SLAB = 16  # slices of 3 mm through the spleen and kidneys, to keep the suite's CPU time down


@pytest.fixture(scope="module")
def slab():
    image, label = (nib.load(REAL_CT / name) for name in ("ct.nii.gz", "labels.nii.gz"))
    labels = np.asarray(label.dataobj).astype(np.int16)
    first = int(np.median(np.nonzero(labels == 1)[2])) - SLAB // 2
    affine = image.affine.copy()
    affine[:3, 3] = image.affine[:3, :3] @ [0, 0, first] + image.affine[:3, 3]
    return Scan(np.asarray(image.dataobj)[..., first:first + SLAB].astype(np.int16), labels[..., first:first + SLAB],
                affine)


@pytest.fixture(scope="module")
def predictor():
    """The shipped model with the encoder `segment` picks for long scans on a CPU (OpenVINO): faster, same masks
    within tests/test_openvino_encoder.py's tolerance."""
    return Predictor(create_model("default"), device="cpu", runtime="openvino")


def card_values(names):
    card = load_card("totalsegmentator")
    return {name: card.resolve(name).label_id for name in names}


def segment(predictor: Predictor, scan: Scan, folder: Path, name: str, boxes: bool) -> dict[str, float]:
    path = folder / f"{name}.nii.gz"
    nib.save(nib.Nifti1Image(scan.image, scan.affine), path)
    predictor.set_volume(path)
    values = card_values(ORGANS)
    prompts = truth_boxes(scan.label, values) if boxes else None
    result = predictor.predict(ORGANS, boxes=prompts)
    return {organ: dice(result.mask(organ), scan.label == values[organ]) for organ in ORGANS}


@pytest.fixture(scope="module")
def grids(slab):
    """The slab on its own grid, as a 410 mm field of view at 0.8 mm with a table, and in 6 mm slices."""
    spacing = np.linalg.norm(slab.affine[:3, :3], axis=0)
    wide = regrid(slab, (0.8, 0.8, spacing[2]), (512, 512, SLAB), offset_mm=(20.0, -15.0))
    thick = regrid(slab, (spacing[0], spacing[1], 6.0), (*slab.image.shape[:2], SLAB // 2), table_hu=None)
    return {"own grid": slab, "512 x 512, 0.8 mm, table": wide, "6 mm slices": thick}


@pytest.mark.parametrize("boxes", [False, True], ids=["text-only", "boxes"])
def test_other_scanner_grids_segment_as_well_as_the_scans_own(grids, predictor, tmp_path, boxes):
    scores = {name: segment(predictor, scan, tmp_path, name.split()[0], boxes) for name, scan in grids.items()}
    means = {name: float(np.mean(list(s.values()))) for name, s in scores.items()}
    assert means["own grid"] > (0.8 if boxes else 0.6), scores  # the model works on its training scan at all
    for name, mean in means.items():
        assert mean >= means["own grid"] - 0.03, (name, scores)


def test_manual_mode_is_never_below_the_bare_backbone(slab, predictor, tmp_path):
    card = load_card("totalsegmentator")
    path = tmp_path / "slab.nii.gz"
    nib.save(nib.Nifti1Image(slab.image, slab.affine), path)
    rows = manual_vs_backbone(predictor, path, slab.label, {card.by_id(v).name: int(v)
                                                            for v in np.unique(slab.label) if v})
    assert len(rows) >= 30  # the slab holds organs, vessels, bones and muscles
    worse = {name: scores for name, scores in rows.items() if scores[0] < scores[1] - 0.01}
    assert worse == {}


def test_working_slice_spacing_keeps_the_dice_of_every_slice(slab, tmp_path):
    """The speed default (the model's working slice spacing, e.g. 3 mm) against every slice of a thin-slice scan:
    the slab re-gridded to 1 mm slices, segmented by name both ways; Dice to the truth within 0.01."""
    assert create_model("default").frame.slice_spacing_mm is not None  # the model works at its own slice spacing
    spacing = np.linalg.norm(slab.affine[:3, :3], axis=0)
    middle = slice(SLAB // 4, SLAB // 4 + SLAB // 2)  # the 8 middle slices through the spleen: 22 at 1 mm
    affine = slab.affine.copy()
    affine[:3, 3] += slab.affine[:3, 2] * middle.start
    half = Scan(slab.image[..., middle], slab.label[..., middle], affine)
    depth = int((SLAB // 2 - 1) * spacing[2]) + 1
    thin = regrid(half, (spacing[0], spacing[1], 1.0), (*slab.image.shape[:2], depth), table_hu=None)
    path = tmp_path / "thin.nii.gz"
    nib.save(nib.Nifti1Image(thin.image, thin.affine), path)
    scores = fast_vs_every_slice("default", path, thin.label, card_values(ORGANS), device="cpu")
    assert (scores["fast slices"], scores["every slice slices"]) == (SLAB // 2, depth)
    assert scores["fast"] >= scores["every slice"] - 0.01, scores


def test_the_one_ct_datalist_trains_on_this_ct_through_its_card():
    """The README's one-real-CT training reads this CT's TotalSegmentator labels by name."""
    cases = load_datalist(REAL_CT / "dataset.json")
    assert [(Path(c["image"]).name, Path(c["label"]).name, c["card"]) for c in cases] == [
        ("ct.nii.gz", "labels.nii.gz", "totalsegmentator")]
