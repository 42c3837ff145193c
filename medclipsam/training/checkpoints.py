"""Adapter-only checkpoints: the trained parameters as safetensors plus a JSON config naming the backbones.

A trained model is a few MB and loads on top of the user's own backbones in one call (`load_model`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from medclipsam import __version__
from medclipsam.atomic import atomic_write
from medclipsam.errors import OutputExistsError, WeightsError
from medclipsam.models.clip_guided_sam import CLIPGuidedSAM, CLIPGuidedSAMConfig

WEIGHTS_FILE = "adapters.safetensors"
CONFIG_FILE = "config.json"


def save_checkpoint(model: CLIPGuidedSAM, folder: str | Path, extra: dict[str, Any] | None = None,
                    overwrite: bool = False, dtype: torch.dtype | None = None) -> Path:
    """Write `folder/adapters.safetensors` and `folder/config.json` atomically; returns the folder. `dtype` (e.g.
    torch.float16 for the shipped model) stores floating tensors at that precision; loading casts them back."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights, config = folder / WEIGHTS_FILE, folder / CONFIG_FILE
    if not overwrite and (weights.exists() or config.exists()):
        raise OutputExistsError(folder, "a checkpoint is already there; pass overwrite=True or choose another folder")
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.trainable_state_dict().items()}
    if dtype is not None:
        state = {name: t.to(dtype) if t.is_floating_point() else t for name, t in state.items()}
    meta = {"medclipsam_version": __version__, "model": model.config.to_dict(), "extra": extra or {}}
    atomic_write(weights, lambda temp: save_file(state, temp))
    atomic_write(config, lambda temp: Path(temp).write_text(json.dumps(meta, indent=2)))
    return folder


def read_checkpoint(folder: str | Path) -> tuple[CLIPGuidedSAMConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """(model config, trained tensors, extra metadata) from a checkpoint folder, with clear errors."""
    folder = Path(folder)
    weights, config = folder / WEIGHTS_FILE, folder / CONFIG_FILE
    for path in (weights, config):
        if not path.is_file():
            raise WeightsError(path, "file not found",
                               f"a medclipsam checkpoint folder holds {WEIGHTS_FILE} and {CONFIG_FILE}")
    try:
        meta = json.loads(config.read_text())
        model_config = CLIPGuidedSAMConfig.from_dict(meta["model"])
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise WeightsError(config, f"not a medclipsam model config ({error})", "re-save the checkpoint") from error
    try:
        state = load_file(str(weights))
    except Exception as error:  # safetensors raises its own error types for truncated or foreign files
        raise WeightsError(weights, f"unreadable or truncated safetensors file ({error})", "re-save the checkpoint") from error
    return model_config, state, meta.get("extra", {})


def load_model(folder: str | Path, device: str | torch.device = "cpu", **backbone_overrides: Any) -> CLIPGuidedSAM:
    """Rebuild a trained model from a checkpoint folder on top of its backbones (override e.g. sam_checkpoint=...)."""
    config, state, _ = read_checkpoint(folder)
    for key, value in backbone_overrides.items():
        if not hasattr(config, key):
            raise ValueError(f"unknown model option {key!r}")
        setattr(config, key, value)
    model = CLIPGuidedSAM(config)
    model.load_trainable_state_dict(state, source=str(Path(folder) / WEIGHTS_FILE))
    return model.to(device).eval()
