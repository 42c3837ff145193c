"""CLIP-Guided SAM as a method like every other: trained by our Trainer, saved in the common checkpoint format,
answering the predictor through the model's own `encode` / `segment`."""
from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from medclipsam.data.frame import FrameSettings
from medclipsam.methods.base import SegmentationMethod
from medclipsam.models.checkpoints import save_checkpoint
from medclipsam.models.clip_guided_sam import CLIPGuidedSAM, CLIPGuidedSAMConfig, ImageFeatures
from medclipsam.models.prompts import SlicePrompts
from medclipsam.training.loop import TrainBudget, report_step
from medclipsam.training.trainer import TrainConfig, Trainer


class CLIPGuidedSAMMethod(SegmentationMethod):
    """Open-vocabulary: any concept name works, text-only or with boxes and clicks."""

    name = "clip_guided_sam"
    settings = ("text", "manual")
    resumable = True

    def __init__(self, concepts: Sequence[str], model: CLIPGuidedSAM | None = None,
                 model_options: dict[str, Any] | None = None, train_options: dict[str, Any] | None = None) -> None:
        super().__init__(concepts)
        self.model = model if model is not None else CLIPGuidedSAM(CLIPGuidedSAMConfig.from_dict(model_options or {}))
        self.image_size = self.model.image_size
        known = {f.name for f in fields(TrainConfig)}
        unknown = set(train_options or {}) - known
        if unknown:
            raise ValueError(f"clip_guided_sam: unknown training options {sorted(unknown)}; known: {sorted(known)}")
        self.train_options = dict(train_options or {})

    @property
    def frame(self) -> FrameSettings:
        """The model's frame settings."""
        return self.model.frame

    @frame.setter
    def frame(self, settings: FrameSettings) -> None:
        self.model.frame = settings

    @property
    def prompt_frame(self) -> FrameSettings:
        """The frame the model answers boxes and clicks in."""
        return self.model.prompt_frame

    def trainer(self, labelled: Sequence[dict], budget: TrainBudget, work_dir: Path | None = None,
                progress: Callable[[str], None] | None = None) -> Trainer:
        """The step-by-step trainer of this method (similarity warm-up, then `budget.steps` pair steps), writing
        the method's checkpoint into `work_dir/model` as it goes when a `work_dir` is given (resumable)."""
        options = {"steps": budget.steps, "seed": budget.seed, **self.train_options}

        def report(step: int, total: int, row: dict[str, Any]) -> None:
            report_step(progress, self.name, step, total, {k: v for k, v in row.items() if isinstance(v, float)})

        def save(folder: Path, extra: dict[str, Any]) -> None:
            save_checkpoint(self, folder, self.name, self.concepts, self.build_options(), self.frame, extra=extra,
                            overwrite=True)

        return Trainer(self.model, labelled, TrainConfig(**options), out_dir=work_dir,
                       on_step=report if progress else None, save_model=save if work_dir is not None else None)

    def fit(self, labelled: Sequence[dict], unlabelled: Sequence[dict], budget: TrainBudget,
            progress: Callable[[str], None] | None = None, work_dir: Path | None = None) -> list[dict[str, float]]:
        """Train with `trainer` (unlabelled slices are not used); resumable from `work_dir` when given."""
        return self.trainer(labelled, budget, work_dir, progress).fit()

    def encode(self, images: torch.Tensor) -> ImageFeatures:
        """The model's concept-free features (frozen trunk, bare embedding, VL image features)."""
        return self.model.encode(images)

    def frozen_image_path(self) -> torch.nn.Module:
        """The frozen SAM part of `encode` as one module, for an inference runtime (`Predictor(runtime=...)`)."""
        return self.model.frozen_image_path()

    def features(self, images: torch.Tensor, trunk: torch.Tensor, bare: torch.Tensor) -> ImageFeatures:
        """`encode`'s result from the frozen image path's outputs."""
        return self.model.features(images, trunk, bare)

    def segment(self, features: ImageFeatures, concepts: Sequence[str],
                prompts: SlicePrompts | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's probabilities and predicted-IoU confidence (text-only, or by its manual mode)."""
        return self.model.segment(features, concepts, prompts)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, concepts: Sequence[str], boxes: torch.Tensor | None = None) -> torch.Tensor:
        """(B, K, S, S) probabilities; boxes (B, K, 4) switch to the manual setting (an all-zero box: no prompt)."""
        prompts = None
        if boxes is not None:
            boxes = boxes.float().masked_fill((boxes.abs().sum(-1) == 0)[..., None], float("nan"))
            empty = SlicePrompts.empty(*boxes.shape[:2])
            prompts = SlicePrompts(boxes.cpu(), empty.points, empty.point_labels)
        return self.segment(self.encode(images.to(self.model.device)), concepts, prompts)[0]

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """What training changed: the model's adapters, heads, projection and tuned decoder."""
        return {f"model.{name}": tensor for name, tensor in self.model.trainable_state_dict().items()}

    def trainable_parameters(self) -> int:
        """Adapters, heads, projection, decoder and prompt encoder (the frozen backbones excluded)."""
        return self.model.parameter_counts()["trainable"]

    def build_options(self) -> dict[str, Any]:
        """The options that rebuild this method (saved in its checkpoint)."""
        return {"model_options": self.model.config.to_dict(), "train_options": self.train_options}
