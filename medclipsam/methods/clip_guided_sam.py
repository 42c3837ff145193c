"""CLIP-Guided SAM as a method of the comparison registry (trained by our Trainer, evaluated like every baseline)."""
from __future__ import annotations

from dataclasses import fields
from typing import Any, Callable, Sequence

import torch

from medclipsam.inference.segment import concept_probabilities
from medclipsam.methods.base import SegmentationMethod, TrainBudget, register_method, report_step
from medclipsam.models.clip_guided_sam import CLIPGuidedSAM, CLIPGuidedSAMConfig
from medclipsam.models.prompts import SpatialPrompts
from medclipsam.training.trainer import TrainConfig, Trainer


class CLIPGuidedSAMMethod(SegmentationMethod):
    """Open-vocabulary: any concept name works, in text-only or manual (box) setting."""

    name = "clip_guided_sam"
    settings = ("text", "manual")

    def __init__(self, concepts: Sequence[str], model: CLIPGuidedSAM | None = None,
                 model_options: dict[str, Any] | None = None, train_options: dict[str, Any] | None = None) -> None:
        super().__init__(concepts)
        self.model = model if model is not None else CLIPGuidedSAM(CLIPGuidedSAMConfig(**(model_options or {})))
        self.image_size = self.model.sam.image_size
        known = {f.name for f in fields(TrainConfig)}
        unknown = set(train_options or {}) - known
        if unknown:
            raise ValueError(f"clip_guided_sam: unknown training options {sorted(unknown)}; known: {sorted(known)}")
        self.train_options = dict(train_options or {})

    def fit(self, labelled: Sequence[dict], unlabelled: Sequence[dict], budget: TrainBudget,
            progress: Callable[[str], None] | None = None) -> list[dict[str, float]]:
        """Similarity warm-up, then `budget.steps` pair steps (unlabelled slices are not used)."""
        options = {"steps": budget.steps, "seed": budget.seed, **self.train_options}

        def report(step: int, total: int, row: dict[str, Any]) -> None:
            terms = {key: value for key, value in row.items() if isinstance(value, float)}
            report_step(progress, self.name, step, total, terms)

        return Trainer(self.model, labelled, TrainConfig(**options), on_step=report if progress else None).fit()

    @torch.no_grad()
    def predict(self, images: torch.Tensor, concepts: Sequence[str], boxes: torch.Tensor | None = None) -> torch.Tensor:
        """(B, K, S, S) probabilities; boxes (B, K, 4) switch to the manual setting."""
        prompts = None if boxes is None else SpatialPrompts(boxes=boxes.reshape(-1, 4).to(self.model.device))
        return concept_probabilities(self.model, images, list(concepts), prompts)[0]

    def trainable_parameters(self) -> int:
        """Adapters, heads, projection, decoder and prompt encoder (the frozen backbones excluded)."""
        return self.model.parameter_counts()["trainable"]


@register_method("clip_guided_sam")
def _build(concepts: Sequence[str], **options: Any) -> CLIPGuidedSAMMethod:
    return CLIPGuidedSAMMethod(concepts, **options)
