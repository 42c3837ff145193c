"""Training losses for CLIP-Guided SAM: mask (BCE + Dice), IoU head, and similarity-map supervision."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss

from medclipsam.models.clip_guided_sam import SegmentationOutput


@dataclass
class LossWeights:
    """Relative weights of the loss terms."""

    mask: float = 1.0
    iou: float = 0.1
    similarity: float = 0.5


def mask_iou(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU of the thresholded prediction with the target per pair, (N,); 1 when both are empty."""
    pred = logits > 0
    truth = target > 0.5
    inter = (pred & truth).sum((1, 2)).float()
    union = (pred | truth).sum((1, 2)).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def similarity_loss(sim_logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """BCE + soft Dice (smoothed by 1) of similarity logits (N, h, w) against masks (N, H, W) area-resized to the
    map's grid; the Dice term keeps small organs from being drowned by background pixels."""
    target = F.interpolate(masks[:, None].float(), size=sim_logits.shape[-2:], mode="area")[:, 0]
    prob = torch.sigmoid(sim_logits)
    dice = 1 - (2 * (prob * target).sum((1, 2)) + 1) / ((prob + target).sum((1, 2)) + 1)
    return F.binary_cross_entropy_with_logits(sim_logits, target) + dice.mean()


class CLIPGuidedSAMLoss(torch.nn.Module):
    """BCE + Dice on the masks (Dice smoothed by 1 so absent organs learn "empty" stably), MSE of the IoU head against
    the achieved IoU, and `similarity_loss` of the calibrated similarity map."""

    def __init__(self, weights: LossWeights | None = None) -> None:
        super().__init__()
        self.weights = weights or LossWeights()
        self.dice_ce = DiceCELoss(sigmoid=True, smooth_nr=1.0, smooth_dr=1.0, reduction="mean")

    def forward(self, output: SegmentationOutput, masks: torch.Tensor) -> dict[str, torch.Tensor]:
        """Loss terms and their weighted total for N pairs; masks (N, H, W) at any resolution."""
        logits = output.mask_logits
        target = F.interpolate(masks[:, None].float(), size=logits.shape[-2:], mode="nearest")
        mask_loss = self.dice_ce(logits[:, None], target)
        iou_loss = F.mse_loss(output.iou, mask_iou(logits.detach(), target[:, 0]))
        sim_loss = similarity_loss(output.similarity_logits, masks)
        w = self.weights
        total = w.mask * mask_loss + w.iou * iou_loss + w.similarity * sim_loss
        return {"total": total, "mask": mask_loss, "iou": iou_loss, "similarity": sim_loss}
