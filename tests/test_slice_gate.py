"""The slice gate: features of a mask's profile along z, a gate fitted on profiles with invented slabs that drops them
and keeps the organ, its storage bound to the weights beside it, and the shipped model's gate."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from medclipsam.errors import WeightsError
from medclipsam.models.factory import default_model_path
from medclipsam.models.slice_gate import (FEATURES, GATE_FILE, OrganGate, SliceGate, load_slice_gate,
                                          slice_features)

SLICE_MM = 3.0


def test_features_read_the_profile_in_millimetres():
    area = np.zeros(40)
    area[10:21] = [1, 2, 4, 6, 8, 10, 8, 6, 4, 2, 1]
    features = slice_features(area, np.full(40, 0.8), SLICE_MM)
    column = {name: features[:, i] for i, name in enumerate(FEATURES)}
    assert features.shape == (40, len(FEATURES))
    assert column["area"][15] == 1.0 and column["area"][13] == pytest.approx(0.6)
    assert column["area_up_10mm"][12] == pytest.approx((10 * 2 / 3 + 8 / 3) / 10)  # 3.33 slices up: 15 and 16
    spread = np.sqrt((((np.arange(40) - 15) * SLICE_MM) ** 2 * area).sum() / area.sum())
    assert column["spread_offset"][15] == pytest.approx(0.0)  # the centre of the bump
    assert column["spread_offset"][25] == pytest.approx(30.0 / (spread + SLICE_MM / 2))  # 30 mm up, in spreads
    assert column["spread_offset"][5] < 0 < column["spread_offset"][25]  # inferior slices negative
    assert column["spread_offset_squared"][20] == pytest.approx(column["spread_offset_abs"][20] ** 2)


def _profile(rng: np.random.Generator, length: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An organ as a bump with confident masks, and an invented slab below it, smaller and less confident."""
    area, confidence, present = np.zeros(length), np.full(length, np.nan), np.zeros(length, dtype=bool)
    start, size = int(rng.integers(25, 35)), int(rng.integers(10, 20))
    area[start:start + size] = 30.0 * np.sin(np.linspace(0.2, np.pi - 0.2, size)) + rng.normal(0, 1, size)
    confidence[start:start + size] = rng.uniform(0.75, 0.9, size)
    present[start:start + size] = True
    low = start - int(rng.integers(12, 20))
    area[low:low + 4] = rng.uniform(8.0, 14.0, 4)
    confidence[low:low + 4] = rng.uniform(0.3, 0.6, 4)
    return area, confidence, present


def test_a_fitted_gate_drops_invented_slabs_and_keeps_the_organ():
    rng = np.random.default_rng(0)
    features, targets, weights = [], [], []
    for _ in range(30):
        area, confidence, present = _profile(rng)
        found = area > 0
        features.append(slice_features(area, confidence, SLICE_MM)[found])
        targets.append(present[found])
        weights.append(area[found])
    gate = SliceGate({"kidney": OrganGate.fit(np.concatenate(features), np.concatenate(targets),
                                              np.concatenate(weights))}, 0.5, 60.0, {})
    area, confidence, present = _profile(np.random.default_rng(99))
    probabilities = torch.zeros(len(area), 2, 8, 8)
    for z, value in enumerate(area):  # area in cm2 -> pixels of 10 mm
        probabilities[z, :, 0, :round(value / 8)] = 0.9
    confidences = torch.from_numpy(np.stack([confidence, confidence], 1))
    keep = gate.keep(probabilities, confidences, ["kidney", "liver"], SLICE_MM, pixel_mm=10.0, mask_threshold=0.5)
    found = probabilities.flatten(2).amax(2)[:, 0] > 0.5
    assert bool(keep[present & found.numpy(), 0].float().mean() >= 0.9)  # the organ stays
    assert not bool(keep[~present & found.numpy(), 0].any())  # the invented slab goes
    assert bool(keep[:, 1].all())  # a concept without a gate is left alone
    short = gate.keep(probabilities[20:35], confidences[20:35], ["kidney"], SLICE_MM, 10.0, 0.5)
    assert bool(short.all())  # 42 mm of scan: shorter than the gate judges


def _checkpoint(folder: Path) -> SliceGate:
    folder.mkdir()
    (folder / "weights.safetensors").write_bytes(b"weights")
    organ = OrganGate(np.zeros(len(FEATURES)), np.ones(len(FEATURES)), np.arange(len(FEATURES), dtype=float), -0.5)
    return SliceGate({"liver": organ}, 0.4, 60.0, {"date": "2026-12-02"})


def test_gate_round_trips_and_is_bound_to_its_weights(tmp_path: Path):
    folder = tmp_path / "model"
    gate = _checkpoint(folder)
    gate.save(folder)
    loaded = load_slice_gate(folder)
    assert loaded.threshold == 0.4 and loaded.min_span_mm == 60.0 and loaded.provenance["date"] == "2026-12-02"
    np.testing.assert_array_equal(loaded.organs["liver"].coefficients, gate.organs["liver"].coefficients)
    assert load_slice_gate(tmp_path) is None  # a folder without a gate
    (folder / "weights.safetensors").write_bytes(b"other weights")
    with pytest.raises(WeightsError, match="fitted for other weights"):
        load_slice_gate(folder)


@pytest.mark.parametrize("change, problem", [
    ({"format": "other"}, "not a medclipsam-slice-gate/1 file"),
    ({"threshold": None}, "cannot be read"),
    ({"organs": {"liver": {"mean": [0.0], "scale": [1.0], "coefficients": [1.0], "intercept": 0.0}}},
     "wrong length"),
])
def test_malformed_gate_is_refused_with_the_fix(tmp_path: Path, change: dict, problem: str):
    folder = tmp_path / "model"
    _checkpoint(folder).save(folder)
    raw = json.loads((folder / GATE_FILE).read_text())
    (folder / GATE_FILE).write_text(json.dumps({**raw, **change}))
    with pytest.raises(WeightsError, match=problem) as error:
        load_slice_gate(folder)
    assert "fit_slice_gate.py" in str(error.value)


def test_shipped_model_has_a_gate_for_its_nine_organs_checked_on_held_out_phantoms():
    gate = load_slice_gate(default_model_path())
    assert gate is not None and len(gate.organs) >= 8
    demos = [row for row in gate.provenance["held_out"] if row["case"].startswith("demo phantom")]
    assert len(demos) == 5 and np.mean([row["with"] for row in demos]) > np.mean([row["without"] for row in demos])
