"""The shipped default model: text-only CLIP-Guided SAM (LiteMedSAM + MiniLM), adapters and heads inside the package.

It is trained on synthetic CT phantoms by the command in the README (`medclipsam train ...`, then
`scripts/ship_default_model.py`); real scans need a model trained on real data.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch

from medclipsam.errors import WeightsError
from medclipsam.models.clip_guided_sam import CLIPGuidedSAM

DEFAULT_MODEL_DIR = "default_text_model"


def default_model_path() -> Path:
    """Folder of the shipped checkpoint inside the installed package."""
    return Path(str(resources.files("medclipsam") / "assets" / DEFAULT_MODEL_DIR))


def load_default_model(device: str | torch.device = "cpu") -> CLIPGuidedSAM:
    """The shipped text-only model on `device`, with a clear error if the package was installed without it."""
    from medclipsam.training.checkpoints import load_model

    folder = default_model_path()
    if not (folder / "config.json").is_file():
        raise WeightsError(folder, "the shipped default model is missing from this installation",
                           "Reinstall medclipsam (pip install -e .), or pass --model with a folder from medclipsam train")
    return load_model(folder, device=device)
