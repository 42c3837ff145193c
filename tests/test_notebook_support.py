"""What the notebooks call besides the experiments: the scale preset, the cases (phantoms or a dataset folder), truth
boxes and card label ids, the label-efficiency pool and tables, and the figures."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from medclipsam.data.concepts import load_card
from medclipsam.data.frame import FrameSettings
from medclipsam.data.phantom import write_phantom_dataset
from medclipsam.errors import InputError
from medclipsam.eval.evaluate import card_labels, segment_case, truth_boxes
from medclipsam.experiments.label_efficiency import case_means, efficiency_table, paired_table
from medclipsam.experiments.plots import dice_vs_labelled_figure, overlay_figure, prompt_consistency_figure, \
    spread_slices
from medclipsam.experiments.setup import SCALE_VARIABLE, experiment_cases, notebook_scale
from medclipsam.inference.predictor import Predictor, Segmentation
from medclipsam.models.factory import build_method
from medclipsam.training.pipeline import load_pool

SHAPE = (32, 32, 8)


def test_notebook_scale_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SCALE_VARIABLE, raising=False)
    assert notebook_scale() == "phantom"
    monkeypatch.setenv(SCALE_VARIABLE, " Tiny ")
    assert notebook_scale() == "tiny"
    monkeypatch.setenv(SCALE_VARIABLE, "huge")
    with pytest.raises(InputError, match="MEDCLIPSAM_NOTEBOOK_SCALE='huge'.*tiny, phantom, full"):
        notebook_scale()


def test_experiment_cases_from_phantoms_and_from_a_dataset_folder(tmp_path) -> None:
    training, held_out = experiment_cases(None, 2, 1, tmp_path / "made", shape=SHAPE)
    assert (len(training), len(held_out)) == (2, 1)
    assert (tmp_path / "made" / "dataset.json").is_file()
    # a dataset without validation cases: held-out cases come out of the training list, disjoint from it
    write_phantom_dataset(tmp_path / "plain", 4, shape=SHAPE)
    training, held_out = experiment_cases(tmp_path / "plain", None, 1, tmp_path / "unused")
    assert len(training) == 3 and len(held_out) == 1
    assert not {c["case_id"] for c in training} & {c["case_id"] for c in held_out}
    subset, _ = experiment_cases(tmp_path / "plain" / "dataset.json", 2, 1, tmp_path / "unused")
    assert len(subset) == 2 and {c["case_id"] for c in subset} <= {c["case_id"] for c in training}
    # with validation cases: those are held out
    write_phantom_dataset(tmp_path / "split", 2, shape=SHAPE, n_validation=2)
    training, held_out = experiment_cases(tmp_path / "split", None, 1, tmp_path / "unused")
    assert [c["case_id"] for c in held_out] == ["phantom_002"] and len(training) == 2


def test_truth_boxes_and_card_labels() -> None:
    card = load_card("phantom")
    liver, spleen = card.resolve("liver").label_id, card.resolve("spleen").label_id
    label = np.zeros((1, 10, 12, 6), dtype=np.uint8)
    label[0, 2:5, 3:9, 1:4] = liver
    assert truth_boxes(label, card, ["liver", "spleen"]) == {"liver": (2, 3, 1, 4, 8, 3)}  # absent: no box
    assert truth_boxes(label[0], card, ["liver"]) == {"liver": (2, 3, 1, 4, 8, 3)}
    unlabelled = {"image": MetaTensor(torch.zeros(1, 10, 12, 6), affine=torch.eye(4)), "image_path": "ct.nii.gz"}
    predictor = Predictor(build_method("empty", card.names(), image_size=32), device="cpu")
    with pytest.raises(InputError, match="ct.nii.gz: the manual setting takes its boxes from the truth label"):
        segment_case(predictor, unlabelled, card, setting="manual")
    predicted = np.zeros((10, 12, 6), dtype=np.uint8)
    predicted[0, 0, 0], predicted[1, 1, 1] = 1, 2
    result = Segmentation(predicted, ["spleen", "liver"], {"spleen": 0.9, "liver": 0.8}, np.eye(4), None)
    recoded = card_labels(result, card)
    assert recoded[0, 0, 0] == spleen and recoded[1, 1, 1] == liver and recoded.sum() == spleen + liver


def test_pool_splits_are_nested_and_cover_the_pool(tmp_path) -> None:
    card = load_card("phantom")
    training, held_out = experiment_cases(None, 3, 1, tmp_path, shape=SHAPE)
    frame = FrameSettings(size=32, field_of_view_mm=100.0)  # the phantoms are 96 mm across: about 1 voxel a pixel
    pool = load_pool(training, held_out, card, frame)
    assert pool.frame == frame
    one, rest_one = pool.split(1, seed=0)
    two, rest_two = pool.split(2, seed=0)
    labelled_one, labelled_two = {i["case_id"] for i in one}, {i["case_id"] for i in two}
    assert len(labelled_one) == 1 and len(labelled_two) == 2 and labelled_one < labelled_two
    assert {i["case_id"] for i in rest_two} == {c["case_id"] for c in training} - labelled_two
    assert len(rest_one) == 2 * SHAPE[2] and "masks" not in rest_one[0]  # every slice, images only
    assert all(len(item["concepts"]) == len(card.concepts) for item in one)  # absent organs listed too
    assert len(pool.held_out) == 1 and pool.held_out[0]["label"] is not None


def _rows() -> list[dict]:
    dice = {("a", 1, 0): 0.2, ("a", 1, 1): 0.4, ("b", 1, 0): 0.5, ("b", 1, 1): 0.5, ("a", 2, 0): 0.6, ("a", 2, 1): 0.6,
            ("b", 2, 0): 0.7, ("b", 2, 1): 0.9}
    return [{"method": m, "labelled": n, "seed": s, "concept": c, "dice": v + (0.1 if c == "x" else 0.0)}
            for (m, n, s), v in dice.items() for c in ("x", "y")]


def test_label_efficiency_tables() -> None:
    per_case = [{"method": "a", "labelled": 1, "seed": 0, "concept": "x", "case_id": case, "dice": dice,
                 "trainable_parameters": 7, "train_seconds": 2.0, "seconds_per_volume": seconds}
                for case, dice, seconds in [("c1", 0.2, 1.0), ("c2", 0.6, 3.0)]]
    assert case_means(per_case) == [{"method": "a", "labelled": 1, "seed": 0, "concept": "x", "dice": 0.4,
                                     "trainable_parameters": 7, "train_seconds": 2.0, "seconds_per_volume": 2.0}]
    rows = _rows()
    table = efficiency_table(rows).splitlines()
    assert table[0] == "| method | 1 labelled | 2 labelled |"
    assert table[2] == "| a | 0.350 ± 0.141 | 0.650 ± 0.000 |"  # per seed: mean over x, y; then mean ± sd
    paired = paired_table(rows, "b", "a", 1).splitlines()
    assert paired[0] == "| organ | a | b | b − a |"
    assert paired[2] == "| x | 0.400 ± 0.141 | 0.600 ± 0.000 | 0.200 ± 0.141 |"
    assert paired[-1] == "| overall | 0.350 ± 0.141 | 0.550 ± 0.000 | 0.200 ± 0.141 |"


def test_figures_show_the_data() -> None:
    labels = torch.zeros(1, 20, 20, 10, dtype=torch.uint8)
    labels[0, 5:10, 5:10, 2:8] = 1
    labels[0, 12:15, 12:15, 4:6] = 3
    assert spread_slices(labels, 3) == [3, 4, 6]
    figure = overlay_figure(torch.rand(1, 20, 20, 10), {"truth": labels, "prediction": labels}, {1: "liver", 3: "x"})
    assert len(figure.axes) == 6 and [t.get_text() for t in figure.legends[0].get_texts()] == ["liver", "x"]
    only_liver = overlay_figure(torch.rand(1, 20, 20, 10), {"truth": labels}, {1: "liver"}, slices=[5])
    names = only_liver.axes[0].texts
    assert [t.get_text() for t in names] == ["liver"]  # label 3 is on slice 5 but not asked for
    assert names[0].get_position() == (12.0, 12.0)  # viewing orientation: x 5-9 and y 5-9 flipped to 10-14
    bars = prompt_consistency_figure([{"trained_with": "text", "evaluated": s, "concept": c, "dice": d}
                                      for s, c, d in [("text", "x", 0.2), ("text", "y", 0.4), ("box", "x", 0.9),
                                                      ("box", "y", 0.7)]]).axes[0].patches
    assert [round(b.get_height(), 3) for b in bars] == [0.3, 0.8]
    curves = dice_vs_labelled_figure(_rows()).axes[0].containers  # one error-bar curve per method
    assert [[round(float(y), 3) for y in c.lines[0].get_ydata()] for c in curves] == [[0.35, 0.65], [0.55, 0.85]]
