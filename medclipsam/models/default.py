"""The default model shipped inside the package: a checkpoint folder (as `save_checkpoint` writes it) at
`medclipsam/assets/default_text_model/`, used by `medclipsam segment` when no --model is given.

No default model is shipped yet: until one is, loading it fails with an error that asks for --model.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch

from medclipsam.errors import WeightsError
from medclipsam.models.clip_guided_sam import CLIPGuidedSAM
from medclipsam.training.checkpoints import CONFIG_FILE, WEIGHTS_FILE, load_model

DEFAULT_MODEL_DIR = "default_text_model"


def default_model_path() -> Path:
    """Folder of the shipped checkpoint inside the installed package (it may not exist)."""
    return Path(str(resources.files("medclipsam") / "assets" / DEFAULT_MODEL_DIR))


def load_default_model(device: str | torch.device = "cpu") -> CLIPGuidedSAM:
    """The shipped default model on `device`; a clear error when this installation has none."""
    folder = default_model_path()
    if not (folder / CONFIG_FILE).is_file() and not (folder / WEIGHTS_FILE).is_file():
        raise WeightsError(folder, "no default model installed",
                           "Pass --model with a checkpoint folder (the model/ folder that `medclipsam train` writes)")
    return load_model(folder, device=device)
