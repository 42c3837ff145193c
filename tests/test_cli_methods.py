"""`medclipsam train|evaluate --method NAME` and `medclipsam compare`, run in-process on tiny CT phantoms.

A method trained by the CLI is saved (method.json + weights.safetensors), reloads exactly, evaluates through the same
code as every other method, and a repeated run with the same seed gives the same weights. Errors are one clear line
and exit code 2. CLIP-Guided SAM stays the default method (its own train/evaluate tests are elsewhere).
"""
from __future__ import annotations

import csv
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from medclipsam.cli import build_parser, main
from medclipsam.data.concepts import load_card
from medclipsam.data.datalists import load_datalist
from medclipsam.data.phantom import write_phantom_dataset
from medclipsam.eval.evaluate import evaluate_method
from medclipsam.methods import sam3 as sam3_module
from medclipsam.models.checkpoints import read_checkpoint
from medclipsam.models.factory import create_model

UNET_OPTIONS = '{"internal_size": 32, "channels": [8, 16]}'


@pytest.fixture(scope="module")
def datalist(tmp_path_factory: pytest.TempPathFactory) -> str:
    """2 training phantoms and 1 held-out one (48 x 48 x 8)."""
    return str(write_phantom_dataset(tmp_path_factory.mktemp("phantoms"), 2, shape=(48, 48, 8), n_validation=1))


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_train_then_evaluate_a_method_by_name(datalist: str, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    assert main(["train", "--method", "intensity_threshold", "--sam", "tiny_vit", "--datalist", datalist,
                 "--out", str(run), "--labelled", "1", "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == str(run / "model")
    saved = read_checkpoint(run / "model")
    assert saved.name == "intensity_threshold" and saved.frame is not None
    method = create_model(run / "model")
    assert torch.isfinite(method.intervals[0]).all()  # the liver's interval was learned and reloaded

    table = tmp_path / "eval.csv"
    assert main(["evaluate", "--method", "intensity_threshold", "--model", str(run / "model"), "--datalist", datalist,
                 "--out", str(table), "--quiet"]) == 0
    rows = read_rows(table)
    card = load_card("phantom")
    assert [r["concept"] for r in rows] == card.names() and {r["method"] for r in rows} == {"intensity_threshold"}
    direct = evaluate_method(method, load_datalist(datalist, "validation"), card)
    assert [float(r["dice"]) for r in rows] == pytest.approx([r["dice"] for r in direct])
    assert float(rows[0]["dice"]) > 0.2  # liver: the threshold finds much of it
    assert "liver" in capsys.readouterr().out


def test_training_follows_the_budget_and_seed(datalist: str, tmp_path: Path) -> None:
    common = ["train", "--method", "supervised_unet", "--method-options", UNET_OPTIONS, "--sam", "tiny_vit",
              "--datalist", datalist, "--steps", "3", "--slices-per-step", "2", "--seed", "1", "--quiet"]
    assert main([*common, "--out", str(tmp_path / "a")]) == 0
    assert main([*common, "--out", str(tmp_path / "b")]) == 0
    assert [r["step"] for r in read_rows(tmp_path / "a" / "log.csv")] == ["1", "2", "3"]
    first, second = (load_file(tmp_path / run / "model" / "weights.safetensors") for run in ("a", "b"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert main([*common, "--out", str(tmp_path / "a")]) == 2  # no silent overwrite
    assert main([*common, "--out", str(tmp_path / "a"), "--overwrite"]) == 0


def test_clear_errors_for_wrong_methods_options_and_settings(datalist: str, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    main(["train", "--method", "intensity_threshold", "--sam", "tiny_vit", "--datalist", datalist, "--out", str(run),
          "--quiet"])
    evaluate = ["evaluate", "--datalist", datalist, "--out", str(tmp_path / "e.csv")]
    cases = [
        ([*evaluate, "--method", "esc_net", "--model", str(run / "model")],
         "holds a trained 'intensity_threshold', not 'esc_net'. Pass --method intensity_threshold"),
        ([*evaluate, "--method", "intensity_threshold", "--model", str(run / "model"), "--setting", "manual"],
         "does not support the 'manual' setting"),
        (["train", "--method", "nope", "--sam", "tiny_vit", "--datalist", datalist, "--out", str(tmp_path / "x")],
         "unknown --method 'nope'"),
        (["train", "--method", "supervised_unet", "--method-options", "{lr: 1}", "--sam", "tiny_vit", "--datalist",
          datalist, "--out", str(tmp_path / "x")], "--method-options is not JSON"),
    ]
    if not sam3_module.sam3_available():
        cases.append(([*evaluate, "--method", "sam3", "--sam", "tiny_vit"], "sam3 package is not installed"))
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv
    assert build_parser().parse_args(["train", "--datalist", "d", "--out", "o"]).method == "clip_guided_sam"


def test_compare_writes_the_table_as_csv_and_markdown(tmp_path: Path, capsys) -> None:
    out = tmp_path / "compare"
    assert main(["compare", "--out", str(out), "--methods", "empty,intensity_threshold", "--labelled", "1,2",
                 "--n-training", "2", "--n-held-out", "1", "--phantom-shape", "48", "48", "8", "--steps", "2",
                 "--sam", "tiny_vit", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "### Dice, 1 labelled volume " in printed and "### HD95 (mm), 2 labelled volumes" in printed
    assert "| intensity_threshold | text |" in printed and "| empty | manual |" in printed
    summary = read_rows(out / "comparison.csv")
    assert {(r["method"], r["setting"], r["labelled"]) for r in summary} == {
        (m, s, n) for n in ("1", "2") for m, s in [("empty", "text"), ("empty", "manual"),
                                                   ("intensity_threshold", "text")]}
    assert (out / "comparison.md").read_text(encoding="utf-8") in printed
    assert sorted(p.name for p in (out / "partial").iterdir()) == [
        f"{m}_{n}labelled.json" for m in ("empty", "intensity_threshold") for n in (1, 2)]


def test_compare_refuses_an_existing_table_before_training(tmp_path: Path, capsys, monkeypatch) -> None:
    from medclipsam.experiments import comparison

    out = tmp_path / "compare"
    out.mkdir()
    (out / "comparison.md").write_text("an earlier table", encoding="utf-8")
    monkeypatch.setattr(comparison, "fit_method", lambda *args, **kwargs: pytest.fail("trained before refusing"))
    assert main(["compare", "--out", str(out), "--methods", "empty", "--phantom-shape", "48", "48", "8",
                 "--sam", "tiny_vit", "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "comparison.md").read_text(encoding="utf-8") == "an earlier table"


def test_without_method_train_and_evaluate_still_run_clip_guided_sam(datalist: str, tmp_path: Path) -> None:
    run = tmp_path / "cgs"
    assert main(["train", "--datalist", datalist, "--out", str(run), "--sam", "tiny_vit", "--vision-language-options",
                 '{"sam_channels": 32, "hidden": 8}', "--steps", "2", "--similarity-steps", "2", "--pairs-per-step",
                 "2", "--slice-step", "4", "--quiet"]) == 0
    assert read_checkpoint(run / "model").name == "clip_guided_sam"
    assert not (run / "model" / "adapters.safetensors").exists()  # one checkpoint format for every method
    table = tmp_path / "cgs.csv"
    assert main(["evaluate", "--model", str(run / "model"), "--datalist", datalist, "--out", str(table),
                 "--setting", "manual", "--quiet"]) == 0
    rows = read_rows(table)
    assert {r["method"] for r in rows} == {"clip_guided_sam"} and len(rows) == len(load_card("phantom").names())


def test_empty_slices_sets_how_many_organ_free_slices_train(tmp_path: Path, capsys) -> None:
    datalist = write_phantom_dataset(tmp_path / "data", 1, shape=(48, 48, 8), n_validation=0)
    label_path = load_datalist(str(datalist))[0]["label"]
    label = nib.load(label_path)
    values = np.asarray(label.dataobj).copy()
    values[..., :3] = 0  # three slices without any organ
    nib.save(nib.Nifti1Image(values, label.affine, label.header), label_path)
    counts = {}
    for ratio in ("0", "inf"):
        assert main(["train", "--method", "intensity_threshold", "--sam", "tiny_vit", "--datalist", str(datalist),
                     "--out", str(tmp_path / ratio), "--empty-slices", ratio]) == 0
        counts[ratio] = int(re.search(r"\((\d+) slices\)", capsys.readouterr().err).group(1))
    assert counts == {"0": 5, "inf": 8}
