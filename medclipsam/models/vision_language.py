"""Vision-language backbones by name: "minilm" (the offline default), "open_clip" (any open_clip model whose weights
the user has) and "biomedclip"; each gives concept embeddings, dense features in the same space and their
similarity map (`medclipsam.models.vl_backbone.VisionLanguageBackbone`)."""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Callable

from medclipsam.errors import WeightsError
from medclipsam.models.vl_backbone import MEDICAL_PROMPT_TEMPLATES, VisionLanguageBackbone, concept_key
from medclipsam.models.vl_minilm import MiniLMSamBackbone, MiniLMTextEncoder, load_minilm_text_encoder
from medclipsam.models.vl_open_clip import BIOMEDCLIP, OpenClipBackbone

__all__ = ["MEDICAL_PROMPT_TEMPLATES", "VisionLanguageBackbone", "concept_key", "MiniLMSamBackbone",
           "MiniLMTextEncoder", "load_minilm_text_encoder", "OpenClipBackbone", "BIOMEDCLIP", "build_vision_language",
           "frozen_vision_language", "VISION_LANGUAGE_BACKBONES"]


def _build_open_clip(model_name: str, pretrained: str | Path | None = None) -> OpenClipBackbone:
    """Any open_clip model (name + tag or file, or a cached hf-hub id)."""
    return OpenClipBackbone(model_name, pretrained)


def _build_biomedclip() -> OpenClipBackbone:
    """BiomedCLIP (PubMedBERT + ViT-B/16, 224²) from the local Hugging Face cache."""
    return OpenClipBackbone(BIOMEDCLIP)


def _build_minilm(sam_channels: int = 256, hidden: int = 256, position_channels: bool = True) -> MiniLMSamBackbone:
    """all-MiniLM-L6-v2 text + trainable SAM-feature projection (offline default)."""
    return MiniLMSamBackbone(sam_channels=sam_channels, hidden=hidden, position_channels=position_channels)


VISION_LANGUAGE_BACKBONES: dict[str, Callable[..., VisionLanguageBackbone]] = {
    "minilm": _build_minilm, "open_clip": _build_open_clip, "biomedclip": _build_biomedclip}


def build_vision_language(name: str = "minilm", **kw: Any) -> VisionLanguageBackbone:
    """Build a registered vision-language backbone: "minilm" (default, offline), "open_clip", "biomedclip"."""
    if name not in VISION_LANGUAGE_BACKBONES:
        close = difflib.get_close_matches(name, list(VISION_LANGUAGE_BACKBONES), n=3, cutoff=0.4)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        choices = f"Choose one of {sorted(VISION_LANGUAGE_BACKBONES)}.{hint}"
        raise WeightsError(name, "unknown vision-language backbone", choices)
    return VISION_LANGUAGE_BACKBONES[name](**kw)


def frozen_vision_language(spec: str | VisionLanguageBackbone, sam_channels: int,
                           kwargs: dict[str, Any] | None = None) -> VisionLanguageBackbone:
    """A given backbone as is, or one built by name ("minilm" sized to the SAM embedding's channels), frozen but for
    its image-to-text projection when it has one (`trainable_part`): what the baselines that read a similarity map
    train."""
    if isinstance(spec, VisionLanguageBackbone):
        backbone = spec
    else:
        options = dict(kwargs or {})
        if spec == "minilm":
            options.setdefault("sam_channels", sam_channels)
        backbone = build_vision_language(spec, **options)
    backbone.requires_grad_(False)
    projection = backbone.trainable_part()
    if projection is not None:
        projection.requires_grad_(True)
    return backbone
