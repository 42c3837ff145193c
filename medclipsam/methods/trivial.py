"""Trivial reference predictors: the bar every learned method has to clear.

"empty" predicts nothing (the Dice a method gets for free on slices without the organ); "intensity_threshold"
predicts every pixel whose grey value lies in an interval learned per concept from labelled pixels (what intensity
alone can do on CT, without any notion of shape or position).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from medclipsam.methods.base import SETTINGS, SegmentationMethod
from medclipsam.training.loop import TrainBudget


class EmptyPredictor(SegmentationMethod):
    """Predicts no pixel for any concept, in either setting: the floor of every comparison."""

    name = "empty"
    settings = SETTINGS

    def __init__(self, concepts: Sequence[str], image_size: int = 256) -> None:
        super().__init__(concepts)
        self.image_size = int(image_size)

    def fit(self, labelled: Sequence[dict], unlabelled: Sequence[dict], budget: TrainBudget,
            progress: Callable[[str], None] | None = None, work_dir: Path | None = None) -> list[dict[str, float]]:
        """Nothing to learn; no steps are taken."""
        return []

    def predict(self, images: torch.Tensor, concepts: Sequence[str],
                boxes: torch.Tensor | None = None) -> torch.Tensor:
        """All-zero probabilities (B, K, S, S); unknown concepts still raise, as for every closed-vocabulary method."""
        self.class_index(concepts)
        batch, _, height, width = images.shape
        return torch.zeros(batch, len(concepts), height, width, device=images.device)


class IntensityThreshold(SegmentationMethod):
    """Per concept, the interval between two percentiles of the grey values inside its labelled masks."""

    name = "intensity_threshold"
    settings = ("text",)

    def __init__(self, concepts: Sequence[str], percentiles: tuple[float, float] = (5.0, 95.0),
                 image_size: int = 256) -> None:
        super().__init__(concepts)
        low, high = (float(p) for p in percentiles)
        if not 0.0 <= low < high <= 100.0:
            raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {percentiles!r}")
        self.percentiles = (low, high)
        self.image_size = int(image_size)
        self.register_buffer("intervals", torch.full((len(self.concepts), 2), float("nan")))

    def fit(self, labelled: Sequence[dict], unlabelled: Sequence[dict], budget: TrainBudget,
            progress: Callable[[str], None] | None = None, work_dir: Path | None = None) -> list[dict[str, float]]:
        """Learn each concept's interval from the labelled slices (a concept never labelled keeps predicting nothing).

        The first image channel holds the grey slice; no optimisation steps are taken, so the history is empty.
        """
        values: dict[int, list[np.ndarray]] = {}
        for item in labelled:
            grey = item["image"][0]
            for concept, mask, present in zip(item["concepts"], item["masks"], item["present"]):
                if present:
                    index = int(self.class_index([concept])[0])
                    values.setdefault(index, []).append(grey[mask > 0.5].cpu().numpy())
        intervals = torch.full_like(self.intervals, float("nan"))
        for index, chunks in values.items():
            intervals[index] = torch.as_tensor(np.percentile(np.concatenate(chunks), self.percentiles))
        self.intervals.copy_(intervals)
        if progress:
            progress(f"learned intensity intervals for {len(values)}/{len(self.concepts)} concepts")
        return []

    def predict(self, images: torch.Tensor, concepts: Sequence[str],
                boxes: torch.Tensor | None = None) -> torch.Tensor:
        """1 where the grey value lies in the concept's interval, else 0 → (B, K, S, S)."""
        self.refuse_boxes(boxes)
        low, high = self.intervals[self.class_index(concepts).to(self.intervals.device)].to(images.device).unbind(-1)
        grey = images[:, :1]
        inside = (grey >= low[None, :, None, None]) & (grey <= high[None, :, None, None])
        return inside.float()
