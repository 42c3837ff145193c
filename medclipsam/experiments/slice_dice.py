"""Quick 2D evaluation of a CLIP-Guided SAM on slice items: Dice pooled over slices, per concept, in the text-only or
the box (manual) setting. Used by tests and benchmarks where volume evaluation would cost too much CPU time."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from medclipsam.models.clip_guided_sam import CLIPGuidedSAM
from medclipsam.models.prompts import mask_box


def item_truth(item: dict, concept: str) -> torch.Tensor:
    """The (S, S) boolean mask of `concept` in a slice item (all False when the item does not list it)."""
    if concept in item["concepts"]:
        return item["masks"][item["concepts"].index(concept)] > 0.5
    return torch.zeros(item["image"].shape[-2:], dtype=torch.bool)


@torch.no_grad()
def predict_item(model: CLIPGuidedSAM, item: dict, concepts: Sequence[str],
                 boxes: torch.Tensor | None = None) -> torch.Tensor:
    """(K, S, S) boolean masks of K concepts on one slice item; boxes (K, 4) switch to the manual setting."""
    out = model(item["image"][None].to(model.device), list(concepts),
                boxes=None if boxes is None else boxes[None].to(model.device))
    logits = F.interpolate(out.mask_logits[0][:, None].float(), size=item["image"].shape[-2:], mode="bilinear",
                           align_corners=False)[:, 0]
    return (logits > 0).cpu()


def pooled_slice_dice(model: CLIPGuidedSAM, items: Sequence[dict], concepts: Sequence[str],
                      with_boxes: bool = False, box_margin: int = 0) -> dict[str, float]:
    """Per concept, Dice pooled over the slices where it is present (prompted only there; boxes from the truth,
    grown by `box_margin` pixels on each side, as a user draws them around an organ)."""
    concepts = list(concepts)
    inter, total = torch.zeros(len(concepts)), torch.zeros(len(concepts))
    for item in items:
        present = [c for c in concepts if item_truth(item, c).any()]
        if not present:
            continue
        boxes = None
        if with_boxes:
            size = item["image"].shape[-1] - 1
            tight = torch.stack([mask_box(item_truth(item, c)) for c in present])
            boxes = (tight + torch.tensor([-1, -1, 1, 1]) * box_margin).clamp(0, size)
        pred = predict_item(model, item, present, boxes)
        for k, concept in enumerate(present):
            index, truth = concepts.index(concept), item_truth(item, concept)
            inter[index] += (pred[k] & truth).sum()
            total[index] += pred[k].sum() + truth.sum()
    return dict(zip(concepts, (2 * inter / total.clamp(min=1)).tolist()))
