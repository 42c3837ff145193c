"""Checkpoints of any registry method, so the bundle's inference and evaluation load whatever its training wrote.

CLIP-Guided SAM keeps its adapter-only format (`adapters.safetensors` + `config.json`, see
`medclipsam.training.checkpoints`). Other methods are saved whole: `method.safetensors` (their state dict) and
`method.json` (registry name, vocabulary and builder options), and are rebuilt through `build_method`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from safetensors.torch import load_model as load_safetensors_into, save_model as save_safetensors_from

from medclipsam import __version__
from medclipsam.errors import WeightsError
from medclipsam.methods.base import SegmentationMethod, build_method
from medclipsam.methods.clip_guided_sam import CLIPGuidedSAMMethod
from medclipsam.training.checkpoints import CONFIG_FILE, WEIGHTS_FILE, atomic_write, load_model

METHOD_WEIGHTS = "method.safetensors"
METHOD_CONFIG = "method.json"


def save_method(method: SegmentationMethod, options: Mapping[str, Any], folder: str | Path,
                extra: Mapping[str, Any] | None = None) -> Path:
    """Write `folder/method.safetensors` and `folder/method.json` atomically (replacing an earlier save)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"medclipsam_version": __version__, "method": method.name, "concepts": list(method.concepts),
            "options": dict(options), "extra": dict(extra or {})}
    text = json.dumps(meta, indent=2)  # fails on options that JSON cannot hold, before anything is written
    atomic_write(folder / METHOD_WEIGHTS, lambda temp: save_safetensors_from(method, temp))
    atomic_write(folder / METHOD_CONFIG, lambda temp: Path(temp).write_text(text))
    return folder


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text())
        if not (isinstance(meta["method"], str) and isinstance(meta["concepts"], list)
                and isinstance(meta["options"], dict)):
            raise TypeError("'method' must be a name, 'concepts' a list and 'options' a mapping")
        return meta
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise WeightsError(path, f"not a medclipsam method config ({error})", "re-run the bundle's training") from error


def load_method(folder: str | Path, concepts: Sequence[str], device: str | torch.device = "cpu") -> SegmentationMethod:
    """The trained method in a checkpoint folder, in eval mode on `device`.

    A CLIP-Guided SAM checkpoint is open-vocabulary and answers for `concepts`; other methods keep the vocabulary
    they were trained with.
    """
    folder = Path(folder)
    if (folder / WEIGHTS_FILE).is_file() or (folder / CONFIG_FILE).is_file():
        return CLIPGuidedSAMMethod(concepts, model=load_model(folder, device=device)).eval()
    weights, config = folder / METHOD_WEIGHTS, folder / METHOD_CONFIG
    if not config.is_file() or not weights.is_file():
        raise WeightsError(folder, f"no checkpoint here (expected {WEIGHTS_FILE} + {CONFIG_FILE} for CLIP-Guided SAM, "
                           f"or {METHOD_WEIGHTS} + {METHOD_CONFIG} for another method)",
                           "point `checkpoint` at the `model/` folder that the bundle's training wrote")
    meta = _read_meta(config)
    method = build_method(meta["method"], meta["concepts"], **meta["options"])
    try:
        load_safetensors_into(method, str(weights), strict=True)
    except Exception as error:  # safetensors and torch raise their own types for truncated or mismatched files
        raise WeightsError(weights, f"does not fit method {meta['method']!r} built from {config.name} ({error})",
                           "re-run the bundle's training") from error
    return method.to(device).eval()
