"""Supervised 2D UNet baseline (MONAI `UNet`, `DiceCELoss`) over a closed vocabulary, and the parts that the
semi-supervised UNet baselines (`mean_teacher`) build on: network, targets and input resizing.

Closed vocabulary: the network has one output channel per concept plus background (channel 0), trained with a
softmax over classes; in the "text" setting a concept name only picks its channel. The network sees the first image
channel (the grey slice) at an internal resolution (default 128, half the 256 slice size, for CPU speed); its
probabilities are resized back to the slice size.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from monai.networks.nets import UNet
from torch import nn

from medclipsam.methods.base import SegmentationMethod
from medclipsam.training.loop import TrainBudget, run_steps

DEFAULT_CHANNELS = (16, 32, 64, 128)


def build_unet(n_classes: int, channels: Sequence[int] = DEFAULT_CHANNELS, num_res_units: int = 2) -> UNet:
    """A 2D MONAI UNet from one grey channel to `n_classes` logits, halving the resolution between levels."""
    channels = tuple(int(c) for c in channels)
    if len(channels) < 2:
        raise ValueError(f"a UNet needs at least two levels of channels, got {channels!r}")
    return UNet(spatial_dims=2, in_channels=1, out_channels=n_classes, channels=channels,
                strides=(2,) * (len(channels) - 1), num_res_units=num_res_units)


def reset_weights(module: nn.Module, seed: int) -> None:
    """Redraw every layer's initial weights from `seed`, leaving the global random state as it was."""
    cuda_devices = sorted({p.device.index for p in module.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(seed)
        for layer in module.modules():
            if hasattr(layer, "reset_parameters"):
                layer.reset_parameters()


def grey_input(images: torch.Tensor, size: int) -> torch.Tensor:
    """The first channel of (B, 3, S, S) slice images, resized (bilinear, antialiased) to (B, 1, size, size)."""
    grey = images[:, :1].float()
    if grey.shape[-1] == size and grey.shape[-2] == size:
        return grey
    return F.interpolate(grey, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def class_targets(items: Sequence[dict], class_index: Callable[[Sequence[str]], torch.Tensor],
                  size: int) -> torch.Tensor:
    """(B, 1, size, size) class map of labelled slice items: 0 background, k + 1 for vocabulary concept k."""
    targets = []
    for item in items:
        target = torch.zeros(item["masks"].shape[-2:], dtype=torch.long)
        present = [k for k, is_present in enumerate(item["present"]) if is_present]
        if present:
            classes = class_index([item["concepts"][k] for k in present]) + 1
            for k, value in zip(present, classes.tolist()):
                target[item["masks"][k] > 0.5] = value
        targets.append(target)
    stacked = torch.stack(targets)[:, None].float()
    if stacked.shape[-1] != size or stacked.shape[-2] != size:
        stacked = F.interpolate(stacked, size=(size, size), mode="nearest-exact")
    return stacked.long()


class SupervisedUNet(SegmentationMethod):
    """A 2D UNet trained with DiceCE on the labelled slices only; the supervised reference for SSL baselines."""

    name = "supervised_unet"
    settings = ("text",)

    def __init__(self, concepts: Sequence[str], channels: Sequence[int] = DEFAULT_CHANNELS, num_res_units: int = 2,
                 internal_size: int = 128, image_size: int = 256, lr: float = 1e-2,
                 weight_decay: float = 1e-4) -> None:
        super().__init__(concepts)
        self.image_size = int(image_size)
        self.internal_size = int(internal_size)
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.net = build_unet(len(self.concepts) + 1, channels, num_res_units)
        self.supervised_loss = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)

    def prediction_net(self) -> nn.Module:
        """The network `predict` runs."""
        return self.net

    def start(self, seed: int) -> torch.optim.Optimizer:
        """Fresh weights drawn from `seed` and a fresh AdamW over them: a fit depends only on its data and budget."""
        reset_weights(self.net, seed)
        self.train()
        return torch.optim.AdamW(self.net.parameters(), lr=self.lr, weight_decay=self.weight_decay)

    def labelled_batch(self, items: Sequence[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """Network inputs (B, 1, s, s) and class targets (B, 1, s, s) of labelled items at the internal size s."""
        images = torch.stack([item["image"] for item in items]).to(self.device)
        targets = class_targets(items, self.class_index, self.internal_size).to(self.device)
        return grey_input(images, self.internal_size), targets

    def fit(self, labelled: Sequence[dict], unlabelled: Sequence[dict], budget: TrainBudget,
            progress: Callable[[str], None] | None = None, work_dir: Path | None = None) -> list[dict[str, float]]:
        """Train from seeded weights on `budget.slices_per_step` labelled slices per step (unlabelled: unused)."""
        optimizer = self.start(budget.seed)

        def loss(indices: list[int], step: int) -> tuple[torch.Tensor, dict[str, float]]:
            images, targets = self.labelled_batch([labelled[i] for i in indices])
            value = self.supervised_loss(self.net(images), targets)
            return value, {"supervised": float(value.detach())}

        return run_steps(self, optimizer, budget, len(labelled), loss, progress)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, concepts: Sequence[str],
                boxes: torch.Tensor | None = None) -> torch.Tensor:
        """Softmax probabilities of the requested concepts' channels at the images' size → (B, K, S, S)."""
        self.refuse_boxes(boxes)
        channels = (self.class_index(concepts) + 1).to(images.device)
        probs = torch.softmax(self.prediction_net()(grey_input(images.to(self.device), self.internal_size)), dim=1)
        probs = probs.to(images.device).index_select(1, channels)
        if probs.shape[-2:] != images.shape[-2:]:
            probs = F.interpolate(probs, size=tuple(images.shape[-2:]), mode="bilinear", align_corners=False)
        return probs
