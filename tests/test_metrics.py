"""Metrics on masks with known geometry, the documented empty cases, aggregation and table writing."""
import csv
import math

import numpy as np
import pytest
import torch

from medclipsam.errors import InputError, OutputExistsError
from medclipsam.eval.metrics import evaluate_case, segmentation_metrics, summarize, write_table

SPACING = (2.0, 1.0, 0.5)


def cube(shape=(30, 30, 30), start=(5, 5, 5), side=10) -> np.ndarray:
    mask = np.zeros(shape, bool)
    x, y, z = start
    mask[x : x + side, y : y + side, z : z + side] = True
    return mask


def test_dice_of_shifted_cubes_is_exact():
    # 10^3 cubes shifted by 3 voxels along x overlap in 7*10*10 voxels: Dice = 2*700/2000.
    scores = segmentation_metrics(cube(), cube(start=(8, 5, 5)), SPACING)
    assert scores["dice"] == pytest.approx(0.7, abs=1e-6)


@pytest.mark.parametrize("axis, shift", [(0, 3), (1, 2), (2, 4)])
def test_hd95_equals_shift_in_mm_with_anisotropic_spacing(axis, shift):
    start = [5, 5, 5]
    start[axis] += shift
    scores = segmentation_metrics(cube(), cube(start=tuple(start)), SPACING)
    assert scores["hd95"] == pytest.approx(shift * SPACING[axis])


def test_nsd_is_one_for_identical_and_zero_for_far_apart():
    same = segmentation_metrics(cube(), torch.from_numpy(cube()), SPACING)
    assert same == {"dice": pytest.approx(1.0), "hd95": pytest.approx(0.0), "nsd": pytest.approx(1.0)}
    far = segmentation_metrics(cube(side=6), cube(start=(20, 20, 20), side=6), SPACING)
    assert far["nsd"] == 0.0 and far["dice"] == 0.0


def test_nsd_counts_only_surface_within_tolerance():
    # shift of 1 voxel along z (0.5 mm) is inside a 2 mm tolerance; 2 voxels along x (4 mm) is not, for the x-faces.
    assert segmentation_metrics(cube(), cube(start=(5, 5, 6)), SPACING)["nsd"] == pytest.approx(1.0)
    assert segmentation_metrics(cube(), cube(start=(7, 5, 5)), SPACING, nsd_tolerance_mm=2.0)["nsd"] < 0.9
    assert segmentation_metrics(cube(), cube(start=(7, 5, 5)), SPACING, nsd_tolerance_mm=4.0)["nsd"] == 1.0


def test_both_empty_is_a_perfect_score():
    empty = np.zeros((8, 8, 8), bool)
    assert segmentation_metrics(empty, empty, SPACING) == {"dice": 1.0, "hd95": 0.0, "nsd": 1.0}


@pytest.mark.parametrize("pred_empty", [True, False])
def test_one_empty_is_the_worst_finite_score(pred_empty):
    shape = (8, 9, 10)
    full, empty = cube(shape, (1, 1, 1), 4), np.zeros(shape, bool)
    pred, truth = (empty, full) if pred_empty else (full, empty)
    scores = segmentation_metrics(pred, truth, SPACING)
    diagonal = math.sqrt((8 * 2.0) ** 2 + (9 * 1.0) ** 2 + (10 * 0.5) ** 2)
    assert scores == {"dice": 0.0, "hd95": pytest.approx(diagonal), "nsd": 0.0}


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="same shape"):
        segmentation_metrics(np.zeros((4, 4, 4), bool), np.zeros((4, 4, 5), bool), SPACING)


def label_volumes():
    truth = np.zeros((30, 30, 30), np.uint8)
    truth[cube(side=10)] = 1
    truth[cube(start=(18, 18, 18), side=8)] = 2
    pred = np.zeros_like(truth)
    pred[cube(start=(8, 5, 5), side=10)] = 1  # label 2 missed entirely
    return pred, truth


def test_evaluate_case_rows_per_concept():
    pred, truth = label_volumes()
    rows = evaluate_case(pred, truth, SPACING, {0: "background", 1: "liver", 2: "spleen"}, "case_7", "unet")
    assert [(r["label_id"], r["concept"]) for r in rows] == [(1, "liver"), (2, "spleen")]
    liver, spleen = rows
    assert liver["case_id"] == "case_7" and liver["method"] == "unet"
    assert liver["dice"] == pytest.approx(0.7, abs=1e-6) and liver["hd95"] == pytest.approx(6.0)
    assert (liver["pred_voxels"], liver["truth_voxels"]) == (1000, 1000)
    assert spleen["dice"] == 0.0 and spleen["nsd"] == 0.0
    assert (spleen["pred_voxels"], spleen["truth_voxels"]) == (0, 512)


def test_summarize_means_sds_and_all_row():
    rows = [
        {"method": "a", "concept": "liver", "dice": 0.8, "hd95": 2.0, "nsd": 0.9},
        {"method": "a", "concept": "liver", "dice": 0.6, "hd95": 4.0, "nsd": 0.7},
        {"method": "a", "concept": "spleen", "dice": 1.0, "hd95": 0.0, "nsd": 1.0},
        {"method": "b", "concept": "liver", "dice": 0.5, "hd95": 8.0, "nsd": 0.5},
    ]
    summary = {(s["method"], s["concept"]): s for s in summarize(rows)}
    assert set(summary) == {("a", "liver"), ("a", "spleen"), ("a", "all"), ("b", "liver"), ("b", "all")}
    liver = summary[("a", "liver")]
    assert liver["n"] == 2 and liver["dice_mean"] == pytest.approx(0.7)
    assert liver["dice_sd"] == pytest.approx(np.std([0.8, 0.6], ddof=1))
    assert liver["hd95_mean"] == pytest.approx(3.0)
    assert summary[("a", "spleen")]["dice_sd"] == 0.0
    assert summary[("a", "all")]["n"] == 3 and summary[("a", "all")]["dice_mean"] == pytest.approx(0.8)
    assert summary[("b", "all")]["nsd_mean"] == pytest.approx(0.5)


def test_write_table_csv_and_markdown(tmp_path):
    pred, truth = label_volumes()
    rows = evaluate_case(pred, truth, SPACING, {1: "liver", 2: "spleen"}, "case_7", "unet")
    csv_path = write_table(rows, tmp_path / "out" / "results.csv")
    with open(csv_path, newline="") as handle:
        read = list(csv.DictReader(handle))
    assert [r["concept"] for r in read] == ["liver", "spleen"]
    assert float(read[0]["dice"]) == pytest.approx(rows[0]["dice"])
    assert list(read[0]) == list(rows[0])

    md_path = write_table(summarize(rows), tmp_path / "summary.md", fmt="md")
    lines = md_path.read_text().splitlines()
    assert lines[0].startswith("| method | concept | n | dice_mean")
    assert len(lines) == 2 + 3 and "| unet | all | 2 |" in lines[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "summary.md"]  # no temp files left


def test_write_table_refuses_overwrite_and_bad_format(tmp_path):
    rows = [{"method": "a", "concept": "liver", "dice": 1.0}]
    path = write_table(rows, tmp_path / "t.csv")
    with pytest.raises(OutputExistsError):
        write_table(rows, path)
    write_table([{"method": "b", "concept": "liver", "dice": 0.5}], path, overwrite=True)
    assert "b,liver,0.5" in path.read_text()
    with pytest.raises(InputError, match="unknown table format"):
        write_table(rows, tmp_path / "t.xlsx", fmt="xlsx")
