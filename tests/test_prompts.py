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


def test_concepts_the_similarity_map_does_not_find_come_out_empty():
    from medclipsam.models.clip_guided_sam import ABSENT_LOGIT, CLIPGuidedSAM, CLIPGuidedSAMConfig

    torch.manual_seed(0)
    model = CLIPGuidedSAM(CLIPGuidedSAMConfig(sam="tiny_vit", adapter_blocks="last1",
                                              vision_language_kwargs={"sam_channels": 32, "hidden": 16})).eval()
    image = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        model.similarity_bias.fill_(-100.0)  # nothing found anywhere
        absent = model(image, ["liver", "spleen"])
        model.similarity_bias.fill_(100.0)  # found everywhere: a whole-image box
        found = model(image, ["liver", "spleen"])
    assert torch.equal(absent.mask_logits, torch.full_like(absent.mask_logits, ABSENT_LOGIT))
    assert torch.equal(absent.iou, torch.zeros_like(absent.iou))
    assert found.mask_logits.std() > 0 and not torch.equal(found.iou, torch.zeros_like(found.iou))


def test_largest_component_connectivity():
    mask = np.zeros((6, 6), dtype=bool)
    mask[0:2, 0:2] = True
    mask[2:5, 2:3] = True  # touches the first block only diagonally
    assert largest_component(mask, connectivity=1).sum() == 4
    assert largest_component(mask, connectivity=2).sum() == 7
