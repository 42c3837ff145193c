"""One checkpoint format for every method: `method.json` (method name, concepts, build options, frame settings) and
`weights.safetensors` (only what training set: the frozen backbones are rebuilt from the options).

A trained CLIP-Guided SAM is a few MB of adapters, heads and decoder; a baseline keeps its LoRA, decoders, UNets or
projections. Folders written before this format still load: CLIP-Guided SAM's `adapters.safetensors` +
`config.json`, and `medclipsam-method/1` folders (both without frame settings: they get the frame the models of
that time were trained with, the whole slice resized by its longest side).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from medclipsam import __version__
from medclipsam.atomic import atomic_write
from medclipsam.data.frame import FrameSettings
from medclipsam.errors import InputError, OutputExistsError, WeightsError
from medclipsam.models.sam import SamBackbone
from medclipsam.models.vision_language import VisionLanguageBackbone

CONFIG_FILE = "method.json"
WEIGHTS_FILE = "weights.safetensors"
FORMAT = "medclipsam-method/2"
FORMAT_WITHOUT_FRAME = "medclipsam-method/1"
LEGACY_WEIGHTS = "adapters.safetensors"  # CLIP-Guided SAM folders written before the common format
LEGACY_CONFIG = "config.json"
_LEGACY_RENAMES = {"sam.mask_decoder.": "mask_decoder.", "sam.prompt_encoder.": "prompt_encoder."}


@dataclass
class SavedMethod:
    """What a checkpoint folder holds: how to build the method, its frame, and the tensors to load on top."""

    name: str
    concepts: list[str]
    options: dict[str, Any]
    frame: FrameSettings | None  # None: the legacy frame of the method's image size
    state: dict[str, torch.Tensor]
    extra: dict[str, Any] = field(default_factory=dict)


def rebuilt_keys(module: nn.Module) -> set[str]:
    """State-dict keys the build options recreate: frozen parameters and buffers of backbone modules."""
    keys: set[str] = set()
    for prefix, child in module.named_modules():
        if isinstance(child, (SamBackbone, VisionLanguageBackbone)):
            stem = f"{prefix}." if prefix else ""
            keys.update(stem + name for name, p in child.named_parameters() if not p.requires_grad)
            keys.update(stem + name for name, _ in child.named_buffers())
    return keys


def trained_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint keeps: the module's own `checkpoint_state()` when it has one, else its state dict
    less `rebuilt_keys` (CPU copies, no shared storage)."""
    own = getattr(module, "checkpoint_state", None)
    state = own() if own is not None else {k: v for k, v in module.state_dict().items()
                                           if k not in rebuilt_keys(module)}
    return {name: tensor.detach().cpu().clone().contiguous() for name, tensor in state.items()}


def save_checkpoint(method: nn.Module, folder: str | Path, name: str, concepts: list[str],
                    options: Mapping[str, Any], frame: FrameSettings, extra: Mapping[str, Any] | None = None,
                    overwrite: bool = False, dtype: torch.dtype | None = None) -> Path:
    """Write `folder/method.json` and `folder/weights.safetensors` atomically; `options` are the build options.
    `dtype` (e.g. float16 for a shipped model) stores floating tensors at that precision; loading casts back."""
    folder = Path(folder)
    try:
        options_json = json.loads(json.dumps(dict(options)))
        extra_json = json.loads(json.dumps(dict(extra or {})))
    except TypeError as error:
        raise InputError(folder, f"the options of {name!r} are not JSON ({error})",
                         "Pass backbones by registry name or checkpoint path, not as built objects") from error
    config, weights = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not overwrite and (config.exists() or weights.exists()):
        raise OutputExistsError(folder, "a trained model is already there; pass overwrite=True (--overwrite) or "
                                        "choose another folder")
    folder.mkdir(parents=True, exist_ok=True)
    state = trained_state(method)
    if dtype is not None:
        state = {key: t.to(dtype) if t.is_floating_point() else t for key, t in state.items()}
    meta = {"format": FORMAT, "medclipsam_version": __version__, "method": name, "concepts": list(concepts),
            "options": options_json, "frame": frame.to_dict(), "extra": extra_json}
    atomic_write(weights, lambda temp: save_file(state, temp))
    atomic_write(config, lambda temp: Path(temp).write_text(json.dumps(meta, indent=2), encoding="utf-8"))
    return folder


def is_checkpoint(folder: str | Path) -> bool:
    """True when `folder` holds a checkpoint config of any supported format."""
    folder = Path(folder)
    return (folder / CONFIG_FILE).is_file() or (folder / LEGACY_CONFIG).is_file()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise WeightsError(path, f"is not readable JSON ({error})", "re-save the model, or point at another "
                                                                     "folder") from None
    if not isinstance(meta, dict):
        raise WeightsError(path, f"holds {type(meta).__name__} JSON, not a model config", "re-save the model")
    return meta


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise WeightsError(path, "file not found", "the folder lost its weights; copy it again or re-run the "
                                                   "training")
    try:
        return {key: tensor.float() if tensor.is_floating_point() else tensor
                for key, tensor in load_file(str(path)).items()}
    except Exception as error:  # safetensors raises its own error types for truncated or foreign files
        raise WeightsError(path, f"unreadable or truncated safetensors file ({error})", "re-save the model") \
            from error


def _read_legacy_adapters(folder: Path) -> SavedMethod:
    meta = _read_json(folder / LEGACY_CONFIG)
    if not isinstance(meta.get("model"), dict):
        raise WeightsError(folder / LEGACY_CONFIG, "holds no 'model' settings, so it is not a medclipsam model "
                           "config", f"point at a folder written by `medclipsam train` ({CONFIG_FILE} + "
                           f"{WEIGHTS_FILE})")
    state = {}
    for key, tensor in _read_tensors(folder / LEGACY_WEIGHTS).items():
        for old, new in _LEGACY_RENAMES.items():
            key = new + key[len(old):] if key.startswith(old) else key
        state["model." + key] = tensor
    return SavedMethod("clip_guided_sam", [], {"model_options": meta["model"]}, None, state,
                       meta.get("extra", {}))


def read_checkpoint(folder: str | Path) -> SavedMethod:
    """A checkpoint folder's contents (any supported format), with clear errors for missing or foreign files."""
    folder = Path(folder)
    if not folder.is_dir():
        raise WeightsError(folder, "is not a folder" if folder.exists() else "does not exist",
                           "pass --model the model/ folder that `medclipsam train` (or the bundle) wrote")
    if not (folder / CONFIG_FILE).is_file():
        if (folder / LEGACY_CONFIG).is_file():
            return _read_legacy_adapters(folder)
        raise WeightsError(folder, f"holds no trained model ({CONFIG_FILE} is missing)",
                           "pass --model the model/ folder that `medclipsam train` (or the bundle) wrote")
    meta = _read_json(folder / CONFIG_FILE)
    missing = [key for key in ("format", "method", "concepts", "options") if key not in meta]
    if missing or meta["format"] not in (FORMAT, FORMAT_WITHOUT_FRAME):
        raise WeightsError(folder / CONFIG_FILE, f"is not a {FORMAT} config (missing {missing}, format "
                           f"{meta.get('format')!r})", "re-save the model with this version of medclipsam")
    frame = FrameSettings.from_dict(meta["frame"]) if "frame" in meta else None
    return SavedMethod(str(meta["method"]), list(meta["concepts"]), dict(meta["options"]), frame,
                       _read_tensors(folder / WEIGHTS_FILE), meta.get("extra", {}))


def load_state(method: nn.Module, state: Mapping[str, torch.Tensor], source: str | Path) -> None:
    """Load checkpoint tensors into a freshly built method; any missing, unexpected or mis-shaped key is an error."""
    own = trained_state(method)
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(k for k in own if k in state and own[k].shape != state[k].shape)
    if missing or unexpected or mismatched:
        raise WeightsError(source, f"does not fit the model its config builds (missing {missing[:4]}, unexpected "
                                   f"{unexpected[:4]}, shape mismatch {mismatched[:4]})",
                           "load it with the medclipsam version and backbones it was trained with")
    method.load_state_dict(dict(state), strict=False)
