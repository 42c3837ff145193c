"""The interface every segmentation method implements: trained by `fit` on 2D slice items in the model's frame,
predicting per-concept probabilities with `predict`, and answering the predictor through `encode` / `segment`.

Settings: "text" (the concept name only) and "manual" (the concept plus a box per (slice, concept)). Methods are
registered as `medclipsam.methods` entry points (pyproject.toml) and built by `medclipsam.models.factory`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import torch
from torch import nn

from medclipsam.data.frame import FrameSettings
from medclipsam.errors import InputError
from medclipsam.models.prompts import SlicePrompts
from medclipsam.training.loop import TrainBudget

SETTINGS = ("text", "manual")


def vocabulary_targets(item: dict, concepts: Sequence[str], method: str) -> torch.Tensor:
    """(K, S, S) masks of a slice item for a closed vocabulary `concepts`: its own mask where it lists the concept,
    zeros otherwise (a concept missing from an item is absent from its slice). KeyError for item concepts outside
    the vocabulary."""
    unknown = [c for c in item["concepts"] if c not in concepts]
    if unknown:
        raise KeyError(f"{method}: training slice concepts {unknown} are not in its vocabulary {list(concepts)}")
    own = dict(zip(item["concepts"], item["masks"]))
    zero = torch.zeros(item["image"].shape[-2:])
    return torch.stack([own.get(c, zero) for c in concepts]).float()


class SegmentationMethod(nn.Module, ABC):
    """A trainable 2D segmentation method over a card's concepts (closed-vocabulary methods use their order)."""

    name: ClassVar[str]
    settings: ClassVar[tuple[str, ...]]  # which of SETTINGS it supports
    image_size: int = 256  # model input size S of the slice items it expects
    resumable: ClassVar[bool] = False  # True: `fit` keeps its state in `work_dir` and continues from it

    def __init__(self, concepts: Sequence[str]) -> None:
        super().__init__()
        self.concepts = list(concepts)
        self._frame: FrameSettings | None = None

    @property
    def frame(self) -> FrameSettings:
        """The frame, modality and window slices reach the method in (saved with it, replayed at inference)."""
        return self._frame or FrameSettings(size=self.image_size)

    @frame.setter
    def frame(self, settings: FrameSettings) -> None:
        if settings.size != self.image_size:
            raise InputError(None, f"{self.name} takes {self.image_size}-pixel slices, not a {settings.size}-pixel "
                             "frame", f"use FrameSettings(size={self.image_size}, ...)")
        self._frame = settings

    def class_index(self, concepts: Sequence[str]) -> torch.Tensor:
        """Indices of `concepts` in this method's vocabulary (closed-vocabulary methods)."""
        unknown = [c for c in concepts if c not in self.concepts]
        if unknown:
            raise KeyError(f"{self.name}: concepts {unknown} are not in its vocabulary {self.concepts}")
        return torch.tensor([self.concepts.index(c) for c in concepts])

    @abstractmethod
    def fit(self, labelled: Sequence[dict], unlabelled: Sequence[dict], budget: TrainBudget,
            progress: Callable[[str], None] | None = None, work_dir: Path | None = None) -> list[dict[str, float]]:
        """Train on slice items within `budget`; returns per-step loss terms. `work_dir` keeps resumable state for
        methods that have it."""

    @abstractmethod
    def predict(self, images: torch.Tensor, concepts: Sequence[str],
                boxes: torch.Tensor | None = None) -> torch.Tensor:
        """(B, K, S, S) probabilities for images (B, 3, S, S) and K concepts; boxes (B, K, 4) in pixels, manual only."""

    def encode(self, images: torch.Tensor) -> Any:
        """Concept-free features of (B, 3, S, S) slices that `segment` reads (here: the images themselves)."""
        return images

    def segment(self, features: Any, concepts: Sequence[str],
                prompts: SlicePrompts | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, K, S, S) probabilities and (B, K) confidence (NaN: no IoU head) for the predictor; with prompts, only
        boxed pairs are predicted (clicks need a method that takes them)."""
        boxes = None
        if prompts is not None:
            if bool((prompts.point_labels >= 0).any()):
                raise InputError(None, f"{self.name} takes boxes, not points", "give a box, or use clip_guided_sam")
            if "manual" not in self.settings:
                raise InputError(None, f"{self.name} supports the text setting only; it takes no boxes",
                                 "leave the boxes out, or use a method with a manual setting")
            boxes = torch.nan_to_num(prompts.boxes, nan=0.0)
        with torch.autocast("cpu", enabled=False):  # CPU bfloat16 is measured for CLIP-Guided SAM only
            probs = self.predict(features, list(concepts), boxes)
        if prompts is not None:
            probs = probs * prompts.active.to(probs.device)[..., None, None]
        return probs, torch.full(probs.shape[:2], float("nan"))

    def refuse_boxes(self, boxes: torch.Tensor | None) -> None:
        """Raise when boxes are given to a method that has no manual setting (it would silently ignore them)."""
        if boxes is not None and "manual" not in self.settings:
            raise ValueError(f"{self.name} supports the text setting only; it takes no boxes")

    def trainable_parameters(self) -> int:
        """Number of parameters that training changes."""
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values() if p.requires_grad)

    @property
    def device(self) -> torch.device:
        """Device of the method's parameters (CPU when it has none)."""
        first = next(self.parameters(), None)
        return first.device if first is not None else torch.device("cpu")
