"""The comparison runner: every method on the same labelled subset, budget and seed, evaluated in the settings it
supports, summarised per organ (Dice/HD95 mean ± sd, parameters, seconds per volume) and written as CSV + Markdown.

Tiny CT phantoms (48 x 48 x 8, framed at 64 px) and cheap methods keep it fast; the methods' own quality is tested
in the tests/test_baseline_*.py files.
"""
from __future__ import annotations

import csv
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest
import torch

from helpers_phantoms import SMALL_PHANTOM_FOV_MM
from medclipsam.data.concepts import load_card
from medclipsam.data.datalists import load_datalist
from medclipsam.data.frame import FrameSettings
from medclipsam.data.phantom import write_phantom_dataset
from medclipsam.errors import InputError, OutputExistsError
from medclipsam.experiments import comparison
from medclipsam.experiments.comparison import ComparisonResult, example_segmentations, partial_path, run_comparison
from medclipsam.experiments.comparison_tables import curve_rows, markdown_tables, summary_rows, write_comparison
from medclipsam.experiments.plots import comparison_boxplot_figure
from medclipsam.methods import sam3 as sam3_module
from medclipsam.methods.base import SegmentationMethod
from medclipsam.models import factory
from medclipsam.models.factory import ENTRY_POINT_GROUP, build_method
from medclipsam.training.loop import TrainBudget
from medclipsam.training.pipeline import fit_method, load_pool

SIZE = 64
FRAME = FrameSettings(size=SIZE, field_of_view_mm=SMALL_PHANTOM_FOV_MM)
UNET = {"image_size": SIZE, "internal_size": 32, "channels": (8, 16)}
METHODS = {"empty": {"image_size": SIZE}, "intensity_threshold": {"image_size": SIZE}, "supervised_unet": UNET,
           "sam3": {"image_size": SIZE, "checkpoint": "sam3.pt"}}
BUDGET = TrainBudget(steps=4, slices_per_step=2, seed=3)


class RandomStart(SegmentationMethod):
    """A plugin method whose only state is drawn from the global random generator when it is built."""

    name, settings, image_size = "random_start", ("text",), SIZE

    def __init__(self, concepts: list[str]) -> None:
        super().__init__(concepts)
        self.weight = torch.nn.Parameter(torch.randn(8))

    def fit(self, labelled, unlabelled, budget, progress=None, work_dir=None) -> list[dict[str, float]]:
        return []

    def predict(self, images: torch.Tensor, concepts, boxes=None) -> torch.Tensor:
        return torch.zeros(len(images), len(concepts), *images.shape[-2:])


@pytest.fixture(scope="module")
def card():
    return load_card("phantom")


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory, card):
    """3 training phantoms and 1 held-out one, framed at 64 px."""
    path = write_phantom_dataset(tmp_path_factory.mktemp("phantoms"), 3, seed=0, shape=(48, 48, 8), n_validation=1)
    return load_pool(load_datalist(path, "training"), load_datalist(path, "validation"), card, FRAME)


@pytest.fixture(scope="module")
def result(pool, card) -> ComparisonResult:
    torch.manual_seed(0)
    if sam3_module.sam3_available():
        pytest.skip("the sam3 package is installed here; this test expects it missing")
    return run_comparison(pool, card, METHODS, [1, 2], BUDGET, settings=("text", "manual"), keep_methods=True)


def test_methods_share_the_labelled_subset_budget_and_seed(result: ComparisonResult, pool, card) -> None:
    labelled, _ = pool.split(2, 0)
    reference = build_method("intensity_threshold", card.names(), image_size=SIZE)
    reference.fit(labelled, [], BUDGET)
    learned = {count: result.methods[("intensity_threshold", count)].intervals.nan_to_num(-1.0) for count in (1, 2)}
    assert torch.equal(learned[2], reference.intervals.nan_to_num(-1.0))  # NaN: a concept never labelled
    assert not torch.equal(learned[1], learned[2])
    again, history, _ = fit_method("supervised_unet", UNET, pool, card, 2, BUDGET)
    assert len(history) == BUDGET.steps  # the budget in steps, and the seed: the same weights again
    kept = result.methods[("supervised_unet", 2)].state_dict()
    assert all(torch.equal(value, kept[key]) for key, value in again.state_dict().items())


def test_each_method_is_evaluated_in_the_settings_it_supports_and_sam3_is_reported_not_faked(
        result: ComparisonResult, pool, card) -> None:
    runs = {(r["method"], r["setting"], r["labelled"]) for r in result.rows}
    supported = [("empty", "text"), ("empty", "manual"), ("intensity_threshold", "text"), ("supervised_unet", "text")]
    assert runs == {(m, s, n) for n in (1, 2) for m, s in supported}
    per_run = len(pool.held_out) * len(card.names())
    assert all(sum((r["method"], r["setting"], r["labelled"]) == run for r in result.rows) == per_run for run in runs)
    assert "not installed" in result.skipped["sam3"] and "pip install" in result.skipped["sam3"]
    unet = next(r for r in result.rows if r["method"] == "supervised_unet")
    assert unet["trainable_parameters"] == result.methods[("supervised_unet", 1)].trainable_parameters() > 0
    assert all(r["seconds_per_volume"] > 0 and r["seed"] == BUDGET.seed for r in result.rows)
    panels = example_segmentations(result, pool.held_out[0], card, 2, settings=("text", "manual"))
    assert sorted(panels) == ["empty (manual)", "empty (text)", "intensity_threshold (text)",
                              "supervised_unet (text)"]
    assert all(tuple(p.shape) == tuple(pool.held_out[0]["image"].shape[1:]) for p in panels.values())
    assert {r["method"] for r in curve_rows(result.rows)} >= {"empty (text)", "empty (manual)"}


def test_summary_and_markdown_from_known_rows() -> None:
    rows = [{"method": "m", "setting": "text", "labelled": 1, "case_id": case, "concept": concept, "dice": dice,
             "hd95": hd95, "trainable_parameters": 123456, "train_seconds": 2.0, "seconds_per_volume": seconds}
            for case, concept, dice, hd95, seconds in [("a", "liver", 1.0, 2.0, 1.0), ("b", "liver", 0.5, 4.0, 3.0),
                                                       ("a", "spleen", 0.0, 10.0, 1.0),
                                                       ("b", "spleen", 0.5, 6.0, 3.0)]]
    summary = {r["concept"]: r for r in summary_rows(rows)}
    assert summary["liver"]["dice_mean"] == 0.75 and summary["liver"]["dice_sd"] == pytest.approx(0.353553, 1e-5)
    assert summary["mean"]["dice_mean"] == 0.5 and summary["mean"]["dice_sd"] == 0.0  # cases a, b: 0.5 and 0.5
    assert summary["mean"]["hd95_mean"] == 5.5 and summary["spleen"]["seconds_per_volume"] == 2.0
    text = markdown_tables(summary_rows(rows), {"sam3": "sam3: the sam3 package is not installed"})
    assert "| method | setting | liver | spleen | mean | trainable params | s / volume |" in text
    assert "| m | text | 0.750 ± 0.354 | 0.250 ± 0.354 | 0.500 ± 0.000 | 0.12M | 2.00 |" in text
    assert "| m | text | 3.0 ± 1.4 | 8.0 ± 2.8 | 5.5 ± 0.7 | 0.12M | 2.00 |" in text
    assert "### Not run" in text and "- **sam3**: sam3: the sam3 package is not installed" in text


def test_write_comparison_writes_csv_and_markdown_and_never_overwrites_silently(result: ComparisonResult,
                                                                                 tmp_path: Path) -> None:
    paths = write_comparison(result, tmp_path / "out")
    with open(paths["summary"], newline="") as handle:
        summary = list(csv.DictReader(handle))
    assert {(r["method"], r["setting"], r["labelled"]) for r in summary if r["concept"] == "mean"} == \
        {(r["method"], r["setting"], str(r["labelled"])) for r in result.rows}
    assert {"dice_mean", "hd95_mean", "trainable_parameters", "seconds_per_volume"} <= set(summary[0])
    assert "### Dice, 2 labelled volumes" in paths["markdown"].read_text() and paths["cases"].is_file()
    with pytest.raises(OutputExistsError, match="overwrite"):
        write_comparison(result, tmp_path / "out")
    write_comparison(result, tmp_path / "out", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in paths.values())
    figure = comparison_boxplot_figure(result.rows, labelled=2)
    assert len(figure.axes) == 2  # Dice and HD95 panels
    assert len(figure.axes[0].patches) + len(figure.axes[0].lines) > 0


def test_a_method_at_another_slice_size_is_refused_clearly(pool, card) -> None:
    with pytest.raises(InputError, match="works on 128-pixel slices but the cases were framed at 64"):
        fit_method("supervised_unet", {**UNET, "image_size": 128}, pool, card, 1, BUDGET)
    with pytest.raises(InputError, match="cannot build method 'supervised_unet'"):
        fit_method("supervised_unet", {"depth": 3}, pool, card, 1, BUDGET)


def test_an_interrupted_comparison_resumes_without_retraining_finished_methods(pool, card, tmp_path: Path,
                                                                              monkeypatch) -> None:
    methods = {"intensity_threshold": METHODS["intensity_threshold"], "supervised_unet": UNET}
    first = run_comparison(pool, card, methods, [1], BUDGET, settings=("text",), resume_dir=tmp_path)
    partial_path(tmp_path, "intensity_threshold", 1).unlink()  # as if the run had stopped before it
    trained = []

    def counting(name, *args, **kwargs):
        trained.append(name)
        return fit_method(name, *args, **kwargs)

    monkeypatch.setattr(comparison, "fit_method", counting)
    second = run_comparison(pool, card, methods, [1], BUDGET, settings=("text",), resume_dir=tmp_path)
    assert trained == ["intensity_threshold"]  # the UNet's saved rows were reused
    key = lambda r: (r["method"], r["case_id"], r["concept"], round(r["dice"], 6))  # noqa: E731
    assert sorted(map(key, second.rows)) == sorted(map(key, first.rows))
    unet = [r for r in second.rows if r["method"] == "supervised_unet"]
    assert unet == [r for r in first.rows if r["method"] == "supervised_unet"]  # timings included: not re-measured
    trained.clear()
    run_comparison(pool, card, methods, [1], TrainBudget(steps=5, slices_per_step=2, seed=3), settings=("text",),
                   resume_dir=tmp_path)
    assert trained == ["intensity_threshold", "supervised_unet"]  # another budget: nothing stale is reused
    trained.clear()
    monkeypatch.setattr(comparison, "PROTOCOL", comparison.PROTOCOL + 1)
    run_comparison(pool, card, methods, [1], BUDGET, settings=("text",), resume_dir=tmp_path)
    assert trained == ["intensity_threshold", "supervised_unet"]  # rows made another way are not reused either


def test_initial_weights_do_not_depend_on_what_ran_before(pool, card, monkeypatch) -> None:
    """A method's random initial weights come from the budget's seed, not from the process's random state (which
    depends on the methods trained before it): a comparison's row must not depend on its method list. The method
    is a plugin, registered as an entry point like a user's package would."""
    registered = factory._builders()
    plugin = EntryPoint("random_start", f"{__name__}:RandomStart", ENTRY_POINT_GROUP)
    monkeypatch.setattr(factory, "_builders", lambda: {**registered, "random_start": plugin})
    assert "random_start" in factory.available_methods()
    first, _, _ = fit_method("random_start", {}, pool, card, 1, BUDGET)
    assert isinstance(first, RandomStart) and first.frame == FRAME
    torch.randn(100)  # another method's training moves the global random state
    second, _, _ = fit_method("random_start", {}, pool, card, 1, BUDGET)
    other_seed, _, _ = fit_method("random_start", {}, pool, card, 1, TrainBudget(steps=4, slices_per_step=2, seed=4))
    assert torch.equal(first.weight, second.weight)
    assert not torch.equal(first.weight, other_seed.weight)
