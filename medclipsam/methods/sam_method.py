"""The base of the methods built on a private copy of a SAM backbone (SAM+LoRA, two-stage, ESC-Net): it owns that
backbone and, for methods that read concept names, a frozen vision-language backbone built under a fixed seed; SAM's
image encoder stays in eval mode while a method trains (TinyViT's BatchNorms must not drift)."""
from __future__ import annotations

from typing import Any, Callable, ClassVar, Sequence

import torch

from medclipsam.methods.base import SegmentationMethod
from medclipsam.models.sam import SamBackbone, private_backbone
from medclipsam.models.vision_language import VisionLanguageBackbone, frozen_vision_language


class SamMethod(SegmentationMethod):
    """`sam`: a registered backbone name (weights from `sam_checkpoint` where it needs a file) or a `SamBackbone`
    (copied). `vision_language`: a registered name built with `vision_language_kwargs` under `seed`, or a backbone
    used as is; left out, the class's `default_vision_language` (None: the method reads no text). `seeded_parts`
    (for subclasses): builds the method's own layers right after the vision-language backbone, under the same seed."""

    default_vision_language: ClassVar[str | None] = None

    def __init__(self, concepts: Sequence[str], sam: str | SamBackbone = "litemedsam", sam_checkpoint: str | None = None,
                 vision_language: str | VisionLanguageBackbone | None = None,
                 vision_language_kwargs: dict[str, Any] | None = None, seed: int = 0,
                 seeded_parts: Callable[["SamMethod"], None] | None = None) -> None:
        super().__init__(concepts)
        self.seed = seed
        self.sam = private_backbone(sam, sam_checkpoint)
        self.image_size = self.sam.image_size
        vision_language = vision_language if vision_language is not None else self.default_vision_language
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            if vision_language is not None:
                self.vision_language = frozen_vision_language(vision_language, self.sam.embedding_dim,
                                                              vision_language_kwargs)
            if seeded_parts is not None:
                seeded_parts(self)

    def train(self, mode: bool = True) -> "SamMethod":
        """Train mode for the method's own parts; SAM's image encoder stays in eval."""
        super().train(mode)
        self.sam.image_encoder.eval()
        return self
