"""The speed/memory benchmark's measurements on a tiny backbone: the figures are consistent with each other, parameter
counts match the model's own, worst-case text timing really decodes every organ, and the table says what it shows."""
from __future__ import annotations

import pytest
import torch

from medclipsam.experiments.speed_memory import (
    SpeedConfig, benchmark_volume, build_timed_method, force_every_concept_found, format_table, measure,
    parameter_totals, time_batches,
)

TINY = SpeedConfig(method="clip_guided_sam", backbone="tiny_vit", batch_sizes=(1, 2), slices=2, target_slices=10,
                   size=64, repeats=1, warmup=0, device="cpu")


@pytest.fixture(scope="module")
def row() -> dict:
    return measure(TINY)


def test_benchmark_volume_is_a_ct_in_hu_cut_to_its_central_slices() -> None:
    case = benchmark_volume(slices=3, target_slices=40, size=48)
    assert tuple(case["image"].shape) == (1, 48, 48, 3) and tuple(case["label"].shape) == (1, 48, 48, 3)
    assert float(case["image"].min()) == pytest.approx(-1024.0, abs=1.0) and float(case["image"].max()) > 100.0
    assert {1, 2}.issubset(set(torch.unique(case["label"]).tolist()))  # liver and spleen in the central slices
    # the default phantom (128 x 128 x 32 voxels of 3 x 3 x 6 mm) resampled to 48 x 48 x 40: the same body in mm
    spacing = torch.diagonal(torch.as_tensor(case["image"].affine))[:3]
    assert torch.allclose(spacing, torch.tensor([8.0, 8.0, 4.8], dtype=spacing.dtype))
    assert torch.equal(torch.as_tensor(case["label"].affine), torch.as_tensor(case["image"].affine))


def test_row_figures_agree_with_each_other(row: dict) -> None:
    assert row["volume_basis"] == "extrapolated from 2 slices" and row["volume_slices"] == 10
    assert row["latency_batch"] == 1 and row["best_batch"] in (1, 2)
    assert row["volume_s_5"] > row["volume_s_1"] > 0  # five organs decode five times per slice
    for count in (1, 5):
        per_slice = row[f"volume_s_{count}"] / row["volume_slices"]
        assert row[f"x_encoder_{count}"] == pytest.approx(1000 * per_slice / row["encoder_ms_per_slice"])
    assert row["peak_memory_mb"] >= row["start_memory_mb"] > 0 and row["memory"] == "peak RSS"
    assert row["precision"] == "fp32" and row["clock"] == "wall" and "threads" in row["device"]


def test_parameter_counts_match_the_models_own() -> None:
    method, label = build_timed_method(TINY, ["liver"])
    counts = method.model.parameter_counts()
    assert parameter_totals(method) == (counts["trainable"], counts["total"])
    assert label == "tiny_vit, adapters last1"


def test_worst_case_text_timing_finds_every_organ() -> None:
    method, _ = build_timed_method(TINY, ["liver", "aorta"])
    image = torch.rand(1, 3, 128, 128)
    force_every_concept_found(method)
    with torch.no_grad():
        out = method.model(image, ["liver", "aorta"])
    assert bool((out.similarity_logits > 0).all())
    assert bool((out.mask_logits > -20.0).any(dim=(-2, -1)).all())  # decoded, not skipped as absent (-20)


def test_every_timed_call_encodes_its_images_again() -> None:
    """two_stage reuses the encoding of a repeated batch; timed calls must not benefit from that."""
    config = SpeedConfig(method="two_stage", backbone="tiny_vit", batch_sizes=(1, 2), repeats=2, warmup=1,
                         device="cpu", clock="cpu")
    method, _ = build_timed_method(config, ["liver"])
    encoded = []
    method.sam.image_encoder.register_forward_hook(lambda module, inputs, output: encoded.append(len(output)))
    with torch.no_grad():
        seconds = time_batches(method, torch.rand(2, 3, 128, 128), "liver", config, torch.device("cpu"))
    assert encoded == [1, 1, 1, 2, 2] and set(seconds) == {1, 2} and min(seconds.values()) > 0


def test_unsupported_setting_and_table(row: dict) -> None:
    skipped = measure(SpeedConfig(method="supervised_unet", backbone=None, setting="manual", device="cpu"))
    assert skipped["note"] == "no manual setting" and "latency_ms" not in skipped
    table = format_table([row, skipped])
    assert "extrapolated from 2 slices" in table and "x encoder, 5 organs" in table
    assert "| supervised_unet | - | manual |" in table and table.count("\n") == 3
