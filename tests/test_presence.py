"""Presence you can trust: a blank volume, a head CT and a brain MR get no abdominal organ, every labelled organ of
the real CT that the model finds stays present (also on a 4-slice crop), and masks outside the organ's reference
ranges are flagged. The model tests run the shipped default model on a few slices of each scan."""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from medclipsam.data.concepts import load_card
from medclipsam.errors import InputError
from medclipsam.inference.predictor import Predictor, Segmentation
from medclipsam.inference.presence import (
    CALIBRATION_FORMAT, PRESENCE_COLUMNS, Presence, assess, calibration_path, load_presence_model,
    presence_columns, without_absent,
)
from medclipsam.inference.presence_features import FEATURES, mask_evidence, scan_evidence
from medclipsam.models.factory import default_model_path

ROOT = Path(__file__).resolve().parents[1]
_SPEC = importlib.util.spec_from_file_location("calibrate_presence", ROOT / "scripts" / "calibrate_presence.py")
calibration = sys.modules.setdefault(_SPEC.name, importlib.util.module_from_spec(_SPEC))
_SPEC.loader.exec_module(calibration)
NINE = load_card("phantom").names()


def _scan(volume: np.ndarray, affine: np.ndarray) -> MetaTensor:
    return MetaTensor(torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None],
                      affine=torch.as_tensor(affine, dtype=torch.float64))


def _segmentation(volume: np.ndarray, masks: dict[str, np.ndarray], spacing=(2.0, 2.0, 2.0),
                  confidence: float = 0.8) -> Segmentation:
    """A hand-made segmentation of `volume` (RAS, `spacing` mm) with one mask per concept."""
    affine = np.diag([*spacing, 1.0])
    labels = np.zeros(volume.shape, dtype=np.uint8)
    for value, mask in enumerate(masks.values(), start=1):
        labels[mask] = value
    return Segmentation(labels, list(masks), {c: confidence for c in masks}, affine, _scan(volume, affine))


def _abdomen_like(shape=(96, 96, 40), seed: int = 0) -> np.ndarray:
    """Air around a fat-rimmed soft-tissue body with CT noise: the scan-wide look of an abdominal CT."""
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.arange(shape[0]) - shape[0] / 2, np.arange(shape[1]) - shape[1] / 2, indexing="ij")
    radius = np.hypot(x, y)[..., None]
    volume = np.where(radius < 40, -100.0, -1000.0) + np.where(radius < 34, 160.0, 0.0)
    return (volume + rng.normal(0.0, 12.0, shape)).astype(np.float32)


def _ball(shape, centre, radius_vox) -> np.ndarray:
    grid = np.indices(shape).astype(np.float64)
    return sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius_vox ** 2


# ---- plausibility flags and the verdict on constructed masks ------------------------------------------------------
def test_small_whole_liver_is_flagged_below_its_adult_range() -> None:
    volume = _abdomen_like()
    liver = _ball(volume.shape, (48, 48, 20), 10)  # 4169 voxels of 8 mm3: 33.4 mL, clear of every face
    verdict = assess(_segmentation(volume, {"liver": liver}), "phantom")["liver"]
    assert any(f.startswith("volume 33.4 mL is below the adult liver range 700-3000 mL") for f in verdict.flags)


def test_cut_organ_is_not_flagged_small_but_a_huge_one_is_flagged() -> None:
    volume = _abdomen_like()
    cut = _ball(volume.shape, (48, 48, 0), 10)  # touches the first slice: legitimately small
    huge = np.zeros(volume.shape, dtype=bool)
    huge[10:86, 10:86, 1:39] = True  # 219488 voxels: 1756 mL of "spleen"
    verdicts = assess(_segmentation(volume, {"liver": cut, "spleen": huge}), "phantom")
    assert not any("volume" in f for f in verdicts["liver"].flags)
    spleen = verdicts["spleen"].flags
    assert any(f.startswith("volume 1756 mL is above the adult spleen range 50-600 mL") for f in spleen)


def test_attenuation_outside_the_organ_range_is_flagged() -> None:
    volume = _abdomen_like()
    gallbladder = _ball(volume.shape, (48, 48, 20), 8)
    volume[gallbladder] = 400.0 + np.random.default_rng(1).normal(0.0, 12.0, int(gallbladder.sum()))
    verdict = assess(_segmentation(volume, {"gallbladder": gallbladder}), "phantom")["gallbladder"]
    assert any(f.startswith("median attenuation 400 HU is above the gallbladder CT range -30 to 100 HU")
               for f in verdict.flags)


def test_organ_without_reference_ranges_gets_no_flags() -> None:
    volume = _abdomen_like()
    verdict = assess(_segmentation(volume, {"esophagus": _ball(volume.shape, (48, 48, 20), 3)}), "btcv")
    assert verdict["esophagus"].flags == ()


def test_empty_mask_is_absent_with_its_reason() -> None:
    volume = _abdomen_like()
    verdict = assess(_segmentation(volume, {"liver": np.zeros(volume.shape, dtype=bool)}), "phantom")["liver"]
    assert not verdict.present and verdict.probability == 0.0 and "no voxel" in verdict.reason


def test_a_constant_volume_has_no_body_and_its_organ_is_absent() -> None:
    volume = np.full((64, 64, 12), 40.0, dtype=np.float32)
    liver = np.zeros(volume.shape, dtype=bool)
    liver[8:56, 8:56, :] = True
    verdict = assess(_segmentation(volume, {"liver": liver}, confidence=0.7), "phantom")["liver"]
    assert not verdict.present and verdict.probability < 0.1
    assert verdict.reason.startswith("presence 0.00") and "the scan has almost no" in verdict.reason
    evidence = scan_evidence(volume)
    assert evidence.air_fraction == evidence.fat_fraction == evidence.bone_fraction == 0.0


def test_texture_is_the_local_noise_of_the_mask() -> None:
    rng = np.random.default_rng(3)
    mask = _ball((40, 40, 30), (20, 20, 15), 12)
    constant = mask_evidence(mask, np.full(mask.shape, 40.0, np.float32), 0.008, (-20.0, 200.0))
    assert constant.noise_hu == 0.0 and constant.median_hu == 40.0 and constant.in_range == 1.0
    noisy = mask_evidence(mask, rng.normal(40.0, 12.0, mask.shape).astype(np.float32), 0.008, (40.0, 200.0))
    assert 11.0 < noisy.noise_hu < 13.0 and 0.45 < noisy.in_range < 0.55 and not noisy.truncated
    assert mask_evidence(mask[:, :, 3:], np.zeros(mask[:, :, 3:].shape, np.float32), 0.008, None).truncated


def test_mr_and_user_placed_organs_are_flagged_but_not_judged() -> None:
    volume = np.full((32, 32, 14), 40.0, dtype=np.float32)
    result = _segmentation(volume, {"liver": _ball(volume.shape, (16, 16, 7), 5)})
    for verdict in (assess(result, "phantom", modality="MR")["liver"],
                    assess(result, "phantom", placed={"liver"})["liver"]):
        assert verdict.present and math.isnan(verdict.probability) and verdict.reason == ""
        assert any(f.startswith("volume 4.1 mL is below the adult liver range") for f in verdict.flags)
    assert not assess(result, "phantom")["liver"].present  # the same mask, text-only on CT: no body, absent


def test_report_columns_and_removal_of_absent_organs() -> None:
    volume = _abdomen_like()
    masks = {"liver": _ball(volume.shape, (40, 48, 20), 8), "spleen": _ball(volume.shape, (60, 48, 20), 6)}
    result = _segmentation(volume, masks)
    verdicts = {"liver": Presence(0.93, True, "", ("volume flag",)), "spleen": Presence(0.2, False, "why", ())}
    columns = presence_columns(verdicts)
    assert columns == {"liver": {"presence": 0.93, "present": True, "reason": "", "flags": "volume flag"},
                       "spleen": {"presence": 0.2, "present": False, "reason": "why", "flags": ""}}
    assert set(columns["liver"]) == set(PRESENCE_COLUMNS)
    kept = without_absent(result, verdicts)
    assert kept.mask("liver").sum() == masks["liver"].sum() and not kept.mask("spleen").any()
    assert math.isnan(kept.confidence["spleen"]) and kept.confidence["liver"] == 0.8
    assert result.mask("spleen").any()  # the original is left as it was


# ---- the calibration file ------------------------------------------------------------------------------------------
def test_shipped_calibration_is_for_the_shipped_model_and_separates() -> None:
    raw = json.loads(calibration_path().read_text(encoding="utf-8"))
    assert raw["format"] == CALIBRATION_FORMAT and raw["features"] == list(FEATURES)
    model = load_presence_model()
    assert model.is_for(default_model_path()), "the default model changed: re-run scripts/calibrate_presence.py"
    assert raw["separation"]["auc"] > raw["separation"]["auc_confidence_alone"]
    assert 0.0 < model.threshold < 1.0 and model.provenance["date"] == raw["date"]


@pytest.mark.parametrize("change, problem", [
    ({"format": "other"}, "not a presence calibration"),
    ({"features": ["confidence"]}, "calibrated on features ['confidence']"),
    ({"scale": [0.0] * len(FEATURES)}, "non-positive scale"),
    ({"intercept": None}, "incomplete or malformed"),
])
def test_malformed_calibration_is_refused(tmp_path: Path, change: dict, problem: str) -> None:
    raw = {"format": CALIBRATION_FORMAT, "features": list(FEATURES), "mean": [0.0] * len(FEATURES),
           "scale": [1.0] * len(FEATURES), "coefficients": [1.0] * len(FEATURES), "intercept": 0.0, "threshold": 0.5}
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps({**raw, **change}), encoding="utf-8")
    with pytest.raises(InputError, match="calibrate_presence.py") as info:
        load_presence_model(path)
    assert problem in str(info.value)
    with pytest.raises(InputError, match="cannot be read"):
        load_presence_model(tmp_path / "missing.json")


def test_head_ct_reader_gives_hu_and_an_honest_affine() -> None:
    if not calibration.HEAD_CT.is_file():
        pytest.skip(f"{calibration.HEAD_CT} is absent: apt-get install invesalius-examples")
    volume, affine = calibration.read_head_ct()
    assert volume.shape == (256, 256, 108) and volume.min() == -1024
    assert np.allclose(np.abs(np.diag(affine)[:3]), [0.957031, 0.957031, 1.5], atol=1e-5)
    middle = volume[64:192, 64:192, 60]
    assert 15 <= np.median(middle) <= 45  # brain
    assert (volume[..., 60] > 700).sum() > 1000  # the skull around it


# ---- the shipped model on real scans -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def predictor() -> Predictor:
    from medclipsam.models.factory import create_model

    return Predictor(create_model("default"), device="cpu")


def _predict(predictor: Predictor, volume: np.ndarray, affine: np.ndarray, organs: list[str]
             ) -> tuple[Segmentation, dict[str, Presence]]:
    predictor.set_volume(_scan(volume, affine))
    result = predictor.predict(organs)
    return result, assess(result, "phantom")


def _needs(path: Path, package: str) -> None:
    if not path.is_file():
        pytest.skip(f"{path} is absent: apt-get install -y {package}")


def test_blank_volume_gets_no_liver(predictor: Predictor) -> None:
    result, verdicts = _predict(predictor, *calibration.blank_volume(40.0), ["liver"])
    assert not verdicts["liver"].present and verdicts["liver"].reason
    assert verdicts["liver"].probability < 0.1
    if result.mask("liver").any():  # what the model invents on it is refused for its lack of tissue or of a body
        assert "texture" in verdicts["liver"].reason or "scan has almost no" in verdicts["liver"].reason


def test_head_ct_gets_no_liver(predictor: Predictor) -> None:
    _needs(calibration.HEAD_CT, "invesalius-examples")
    _, verdicts = _predict(predictor, *calibration.head_ct_slab(40, slices=4), ["liver"])
    assert not verdicts["liver"].present and verdicts["liver"].reason


def test_brain_mr_gets_no_spleen(predictor: Predictor) -> None:
    _needs(calibration.COLIN27, "mricron-data")
    _, verdicts = _predict(predictor, *calibration.colin27_slab(100, slices=4), ["spleen", "liver"])
    assert all(not v.present and v.reason for v in verdicts.values()), verdicts  # the liver too, should it be drawn


def _real_ct(slab: str) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    case = next(c for c in calibration.real_ct_cases() if c.name == f"real CT {slab}")
    return case.volume, case.affine, case.truth


@pytest.mark.parametrize("slab, required", [
    ("slices 88-93", None),  # all nine are labelled here: every one the model finds must stay
    ("spleen crop", ["liver", "spleen", "aorta"]),  # 4 slices: cut organs are legitimately small
])
def test_real_ct_organs_that_are_there_stay_present(predictor: Predictor, slab: str, required: list[str] | None
                                                   ) -> None:
    volume, affine, truth = _real_ct(slab)
    result, verdicts = _predict(predictor, volume, affine, NINE)
    found = [organ for organ in NINE if truth[organ].any() and result.mask(organ).any()
             and (result.mask(organ) & truth[organ]).sum() >= calibration.MIN_PRECISION * result.mask(organ).sum()]
    judged = found if required is None else required
    assert set(judged) <= set(found) and len(judged) >= (6 if required is None else 3), found  # not invented
    absent = {organ: verdicts[organ].reason for organ in judged if not verdicts[organ].present}
    assert absent == {}


def test_segment_reports_a_blank_scans_liver_absent_with_its_reason(tmp_path: Path, capsys) -> None:
    import nibabel as nib

    from medclipsam.cli import main

    volume, affine = calibration.blank_volume(40.0)
    scan = tmp_path / "blank.nii.gz"
    nib.save(nib.Nifti1Image(volume, affine), scan)
    out = tmp_path / "out"
    assert main(["segment", str(scan), "--prompt", "liver", "--out", str(out)]) == 0
    assert "blank: liver reported absent (presence 0.0" in capsys.readouterr().err
    report = json.loads((out / "blank" / "report.json").read_text(encoding="utf-8"))
    liver = report["concepts"][0]
    assert liver["concept"] == "liver" and liver["present"] is False and liver["voxels"] == 0
    assert liver["presence"] < 0.1 and liver["reason"].startswith("presence ")
    labels = np.asarray(nib.load(out / "blank" / report["labels"]).dataobj)
    assert labels.shape == volume.shape and not labels.any()  # the invented liver is not in the label map
