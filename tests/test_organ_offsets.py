"""Organ offsets: each organ's own decision threshold for text-only masks, stored bound to the weights beside them,
and the shipped model's offsets checked on held-out phantoms."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from medclipsam.errors import WeightsError
from medclipsam.models.factory import default_model_path
from medclipsam.models.organ_offsets import OFFSETS_FILE, OrganOffsets, load_organ_offsets


def test_an_offset_moves_one_organs_threshold_and_keeps_zeros():
    probabilities = torch.tensor([0.0, 0.3, 0.5, 0.9]).reshape(4, 1, 1, 1).repeat(1, 2, 2, 2)
    shifted = OrganOffsets({"pancreas": 1.0}, {}).apply(probabilities.clone(), ["pancreas", "liver"])
    logit = torch.logit(torch.tensor([0.3, 0.5, 0.9]))
    assert torch.allclose(shifted[1:, 0, 0, 0], torch.sigmoid(logit + 1.0), atol=1e-5)
    assert shifted[2, 0, 0, 0] > 0.5 and shifted[1, 0, 0, 0] > 0.3  # more of the pancreas passes the threshold
    assert shifted[0, 0].eq(0).all()  # dropped or outside the frame stays dropped
    assert torch.equal(shifted[:, 1], probabilities[:, 1])  # an organ without an offset is left alone


def _saved(folder: Path) -> OrganOffsets:
    folder.mkdir()
    (folder / "weights.safetensors").write_bytes(b"weights")
    offsets = OrganOffsets({"liver": -0.5, "pancreas": 1.5}, {"date": "2026-12-03"})
    offsets.save(folder)
    return offsets


def test_offsets_round_trip_and_are_bound_to_their_weights(tmp_path: Path):
    folder = tmp_path / "model"
    saved = _saved(folder)
    loaded = load_organ_offsets(folder)
    assert loaded == saved
    assert load_organ_offsets(tmp_path) is None  # a folder without offsets
    (folder / "weights.safetensors").write_bytes(b"other weights")
    with pytest.raises(WeightsError, match="fitted for other weights") as error:
        load_organ_offsets(folder)
    assert "fit_organ_offsets.py" in str(error.value)


@pytest.mark.parametrize("change, problem", [
    ({"format": "other"}, "not a medclipsam-organ-offsets/1 file"),
    ({"offsets": {"liver": "high"}}, "cannot be read"),
    ({"offsets": {"liver": float("nan")}}, "not a finite number"),
])
def test_malformed_offsets_are_refused_with_the_fix(tmp_path: Path, change: dict, problem: str):
    folder = tmp_path / "model"
    _saved(folder)
    raw = json.loads((folder / OFFSETS_FILE).read_text())
    (folder / OFFSETS_FILE).write_text(json.dumps({**raw, **change}))
    with pytest.raises(WeightsError, match=problem) as error:
        load_organ_offsets(folder)
    assert "fit_organ_offsets.py" in str(error.value)


def test_shipped_model_has_offsets_that_help_the_held_out_demo_phantoms():
    offsets = load_organ_offsets(default_model_path())
    assert offsets is not None and len(offsets.offsets) == 9
    demos = [row for row in offsets.provenance["held_out"] if row["case"].startswith("demo phantom")]
    assert len(demos) == 5 and np.mean([row["with"] for row in demos]) > np.mean([row["without"] for row in demos])
