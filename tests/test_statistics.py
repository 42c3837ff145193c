"""Organ statistics: exact volume, intensity statistics against numpy, world box under an oblique affine,
26-connected components, absent organs reported as absent, and the merge into the report rows."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from medclipsam.inference.report import volume_report
from medclipsam.inference.statistics import BBOX_COLUMNS, STATISTICS_COLUMNS, merge_statistics, organ_statistics

SHAPE = (10, 12, 8)
VALUES = {"liver": 1, "spleen": 2, "pancreas": 3}


def oblique_affine() -> np.ndarray:
    """Rotated, anisotropic, offset RAS affine (spacing 0.7 x 0.9 x 2.5 mm)."""
    a, b = np.deg2rad(25.0), np.deg2rad(-10.0)
    around_z = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    around_x = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    affine = np.eye(4)
    affine[:3, :3] = around_z @ around_x @ np.diag([0.7, -0.9, 2.5])
    affine[:3, 3] = [-40.0, 12.5, 300.0]
    return affine


@pytest.fixture()
def case() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Liver: a 3x3x2 block plus a voxel touching it only at a corner, and a separate 2x2x2 block (2 components
    with 26-connectivity, 3 with 6-connectivity); spleen one block; pancreas absent."""
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[1:4, 1:4, 1:3] = 1
    labels[4, 4, 3] = 1
    labels[7:9, 8:10, 5:7] = 1
    labels[5:9, 1:3, 0:2] = 2
    intensities = np.random.default_rng(3).normal(50.0, 20.0, SHAPE).astype(np.float32)
    return labels, intensities, oblique_affine()


def test_volume_intensity_box_and_components(case) -> None:
    labels, intensities, affine = case
    rows = {row["concept"]: row for row in organ_statistics(labels, intensities, affine, VALUES)}
    voxel_ml = abs(np.linalg.det(affine[:3, :3])) / 1000.0
    for concept, value in (("liver", 1), ("spleen", 2)):
        row, mask = rows[concept], labels == value
        values = intensities[mask].astype(np.float64)
        assert row["present"] is True and row["label"] == value
        assert row["voxels"] == int(mask.sum())
        assert row["volume_ml"] == pytest.approx(mask.sum() * voxel_ml, abs=1e-3)
        assert row["intensity_mean"] == pytest.approx(values.mean(), abs=1e-3)
        assert row["intensity_sd"] == pytest.approx(values.std(), abs=1e-3)
        assert row["intensity_median"] == pytest.approx(np.median(values), abs=1e-3)
        centres = np.array([affine @ [i, j, k, 1.0] for i, j, k in zip(*np.nonzero(mask))])[:, :3]
        expected = [*centres.min(axis=0), *centres.max(axis=0)]
        assert [row[c] for c in BBOX_COLUMNS] == pytest.approx(expected, abs=1e-3)
    assert rows["liver"]["voxels"] == 18 + 1 + 8
    assert rows["liver"]["components"] == 2
    assert rows["spleen"]["components"] == 1


def test_absent_organ_is_reported_absent(case) -> None:
    labels, intensities, affine = case
    absent = organ_statistics(labels, intensities, affine, VALUES)[2]
    assert absent["concept"] == "pancreas" and absent["present"] is False
    assert absent["voxels"] == 0 and absent["volume_ml"] == 0.0 and absent["components"] == 0
    assert all(absent[c] is None for c in ("intensity_mean", "intensity_sd", "intensity_median", *BBOX_COLUMNS))
    beyond = organ_statistics(labels, intensities, affine, {"kidney": 40})[0]
    assert beyond["present"] is False and beyond["label"] == 40


def test_channel_first_tensors_and_float_labels(case) -> None:
    labels, intensities, affine = case
    expected = organ_statistics(labels, intensities, affine, VALUES)
    as_tensors = organ_statistics(torch.from_numpy(labels.astype(np.float32))[None],
                                  torch.from_numpy(intensities)[None], torch.from_numpy(affine), VALUES)
    assert as_tensors == expected


def test_mismatched_grids_are_refused(case) -> None:
    labels, intensities, affine = case
    with pytest.raises(ValueError, match="same grid"):
        organ_statistics(labels, intensities[:, :, :-1], affine, VALUES)
    with pytest.raises(ValueError, match="4x4"):
        organ_statistics(labels, intensities, affine[:3], VALUES)


def test_merge_into_report_rows_keeps_confidence(case) -> None:
    labels, intensities, affine = case
    confidence = {"liver": 0.91, "spleen": 0.8, "pancreas": 0.12}
    report = volume_report(labels, affine, VALUES, confidence)
    merged = merge_statistics(report, organ_statistics(labels, intensities, affine, VALUES))
    assert [row["concept"] for row in merged] == list(VALUES)
    for before, after in zip(report, merged):
        assert {k: after[k] for k in before} == before
        assert set(STATISTICS_COLUMNS) <= set(after)
    pancreas = merged[2]
    assert pancreas["present"] is False and pancreas["confidence"] == 0.12 and pancreas["volume_ml"] == 0.0
    assert merged[0]["present"] is True and merged[0]["volume_ml"] == report[0]["volume_ml"]


def test_merge_refuses_rows_from_another_label_map(case) -> None:
    labels, intensities, affine = case
    report = volume_report(labels, affine, VALUES, {})
    other = labels.copy()
    other[0, 0, 0] = 1
    with pytest.raises(ValueError, match="different label maps"):
        merge_statistics(report, organ_statistics(other, intensities, affine, VALUES))
    with pytest.raises(ValueError, match="no statistics row"):
        merge_statistics(report, organ_statistics(labels, intensities, affine, {"liver": 1}))
