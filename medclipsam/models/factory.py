"""One way to get a model: `create_model("default" | a checkpoint folder | a method name, ...)`.

Methods (CLIP-Guided SAM and every baseline) are found through the `medclipsam.methods` entry-point group, the
standard Python plugin mechanism: medclipsam registers its own in pyproject.toml, and a user's package can add
more. The model layer never imports the methods' training code; it only builds what the entry points name.
"""
from __future__ import annotations

import difflib
from importlib import metadata, resources
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from medclipsam.data.frame import FrameSettings
from medclipsam.errors import WeightsError
from medclipsam.models.checkpoints import is_checkpoint, load_state, read_checkpoint
from medclipsam.models.organ_offsets import load_organ_offsets
from medclipsam.models.slice_gate import load_slice_gate

ENTRY_POINT_GROUP = "medclipsam.methods"
DEFAULT_MODEL = "default"
DEFAULT_MODEL_DIR = "default_model"


def default_model_path() -> Path:
    """Folder of the model shipped inside the installed package."""
    return Path(str(resources.files("medclipsam") / "assets" / DEFAULT_MODEL_DIR))


def _builders() -> dict[str, metadata.EntryPoint]:
    return {entry.name: entry for entry in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def available_methods() -> list[str]:
    """Names of every registered method (CLIP-Guided SAM, the baselines, any plugin's)."""
    return sorted(_builders())


def method_builder(name: str) -> Callable[..., nn.Module]:
    """The builder `fn(concepts, **options)` registered under `name`; WeightsError listing the known names."""
    builders = _builders()
    if name not in builders:
        close = difflib.get_close_matches(name, list(builders), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise WeightsError(name, "is neither a checkpoint folder nor a method name",
                           f"Pass a folder written by `medclipsam train`, 'default', or one of "
                           f"{', '.join(sorted(builders))}.{hint}")
    return builders[name].load()


def build_method(name: str, concepts: Sequence[str], **options: Any) -> nn.Module:
    """An untrained method by registry name over the given concept names, with its own build options."""
    return method_builder(name)(list(concepts), **options)


def load_checkpoint(folder: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """A trained method from a checkpoint folder (any supported format), in eval mode on `device`."""
    saved = read_checkpoint(folder)
    method = build_method(saved.name, saved.concepts, **saved.options)
    load_state(method, saved.state, Path(folder))
    method.frame = saved.frame or FrameSettings(size=method.image_size, fit="scan")
    method.checkpoint_extra = saved.extra
    method.slice_gate = load_slice_gate(folder)
    method.organ_offsets = load_organ_offsets(folder)
    return method.to(device).eval()


def create_model(source: str | Path = DEFAULT_MODEL, concepts: Sequence[str] = (),
                 device: str | torch.device = "cpu", **options: Any) -> nn.Module:
    """The model `source` names, in eval mode on `device`: "default" (the shipped model), a checkpoint folder, or
    a method name (built untrained over `concepts` with `options`, e.g. for zero-shot methods or training)."""
    if str(source) == DEFAULT_MODEL:
        folder = default_model_path()
        if not is_checkpoint(folder):
            raise WeightsError(folder, "no default model is installed with this copy of medclipsam",
                               "Reinstall medclipsam, or pass a model folder written by `medclipsam train`")
        return load_checkpoint(folder, device)
    path = Path(source)
    if path.exists():
        return load_checkpoint(path, device)
    if len(path.parts) > 1 or str(source).startswith("."):
        raise WeightsError(path, "does not exist", "pass --model the model/ folder that `medclipsam train` wrote")
    return build_method(str(source), concepts, **options).to(device).eval()
