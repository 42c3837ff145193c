"""Loss terms fall as predictions approach the target and the IoU helper handles empty masks."""
import torch

from medclipsam.models.clip_guided_sam import SegmentationOutput
from medclipsam.training.losses import CLIPGuidedSAMLoss, mask_iou


def _output(logits, iou, sim):
    return SegmentationOutput(mask_logits=logits, iou=iou, similarity_logits=sim)


def test_mask_iou_including_empty():
    target = torch.zeros(2, 8, 8)
    target[0, :4] = 1
    logits = torch.full((2, 8, 8), -5.0)
    logits[0, :2] = 5.0
    assert mask_iou(logits, target).tolist() == [0.5, 1.0]


def test_loss_prefers_the_right_mask_and_similarity():
    target = torch.zeros(1, 32, 32)
    target[0, 8:24, 8:24] = 1
    good = _output((target * 20 - 10), torch.ones(1), (target[:, ::4, ::4] * 20 - 10))
    bad = _output((10 - target * 20), torch.zeros(1) + 0.9, (10 - target[:, ::4, ::4] * 20))
    loss = CLIPGuidedSAMLoss()
    good_terms, bad_terms = loss(good, target), loss(bad, target)
    for name in ("mask", "similarity", "total"):
        assert good_terms[name] < 0.1 * bad_terms[name]
    assert good_terms["iou"] < 1e-6 and bad_terms["iou"] > 0.5


def test_empty_target_rewards_empty_prediction():
    target = torch.zeros(1, 16, 16)
    loss = CLIPGuidedSAMLoss()
    empty = loss(_output(torch.full((1, 16, 16), -10.0), torch.ones(1), torch.full((1, 4, 4), -10.0)), target)
    full = loss(_output(torch.full((1, 16, 16), 10.0), torch.ones(1), torch.full((1, 4, 4), 10.0)), target)
    assert empty["mask"] < 0.05 < 1.0 < full["mask"]
