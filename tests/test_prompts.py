"""Spatial prompts derived from a similarity map (text-only mode)."""
import numpy as np
import torch

from medclipsam.models.prompts import boxes_from_similarity, largest_component, points_from_similarity


def test_points_from_similarity_mark_the_peak():
    logits = torch.full((1, 8, 8), -5.0)
    logits[0, 2, 6] = 3.0
    prompts = points_from_similarity(logits, count=2, image_size=256)
    assert prompts.points[0, 0].tolist() == [(6 + 0.5) * 32, (2 + 0.5) * 32]
    assert prompts.point_labels[0].tolist() == [1, -1]


def test_largest_component_keeps_only_the_biggest_region():
    mask = np.zeros((10, 10), dtype=bool)
    mask[0:2, 0:2] = True
    mask[5:9, 4:8] = True
    kept = largest_component(mask)
    assert kept.sum() == 16 and kept[5:9, 4:8].all() and not kept[0:2, 0:2].any()
    assert not largest_component(np.zeros((4, 4), dtype=bool)).any()


def test_boxes_from_similarity_bound_the_largest_region_in_pixels():
    logits = torch.full((2, 16, 16), -4.0)
    logits[0, 4:8, 2:6] = 2.0  # region rows 4..7, columns 2..5
    logits[0, 14, 14] = 2.0  # a stray cell, smaller: ignored
    boxes, found = boxes_from_similarity(logits, image_size=256, margin=0)
    assert found.tolist() == [True, False]
    assert boxes[0].tolist() == [2 * 16, 4 * 16, 6 * 16 - 1, 8 * 16 - 1]
    assert boxes[1].tolist() == [0, 0, 255, 255]
    grown, _ = boxes_from_similarity(logits, image_size=256, margin=1)
    assert grown[0].tolist() == [1 * 16, 3 * 16, 7 * 16 - 1, 9 * 16 - 1]
