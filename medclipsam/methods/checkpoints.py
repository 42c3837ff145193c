"""Saved methods: `method.json` (registry name, concepts, build options) + `weights.safetensors` (what training set).

A method is rebuilt with `build_method(name, concepts, **options)` and the saved tensors are loaded on top, so the
options must be JSON (backbones by name or path, not as objects). The tensors are the method's whole state dict
except the frozen parts of its backbones (`SamBackbone`, `VisionLanguageBackbone`), which the options rebuild: a
trained method is as small as what it trained (LoRA, decoders, projections, UNets, EMA teachers, learned intervals).
`medclipsam train --method` and the bundle's training write one; `medclipsam evaluate --method` and the bundle's
inference and evaluation read it (`load_trained_method` also reads CLIP-Guided SAM's adapter checkpoints).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from safetensors.torch import load_file, save_file

from medclipsam import __version__
from medclipsam.atomic import atomic_write
from medclipsam.errors import InputError, OutputExistsError, WeightsError
from medclipsam.methods.base import SegmentationMethod, build_method
from medclipsam.methods.clip_guided_sam import CLIPGuidedSAMMethod
from medclipsam.models.sam import SamBackbone
from medclipsam.models.vision_language import VisionLanguageBackbone
from medclipsam.training.checkpoints import CONFIG_FILE as ADAPTER_CONFIG, WEIGHTS_FILE as ADAPTER_WEIGHTS, load_model

CONFIG_FILE = "method.json"
WEIGHTS_FILE = "weights.safetensors"
FORMAT = "medclipsam-method/1"


def rebuilt_keys(method: SegmentationMethod) -> set[str]:
    """State-dict keys the build options recreate: frozen parameters and the buffers of backbone modules."""
    keys: set[str] = set()
    for prefix, module in method.named_modules():
        if isinstance(module, (SamBackbone, VisionLanguageBackbone)):
            stem = f"{prefix}." if prefix else ""
            keys.update(stem + name for name, p in module.named_parameters() if not p.requires_grad)
            keys.update(stem + name for name, _ in module.named_buffers())
    return keys


def method_state(method: SegmentationMethod) -> dict[str, torch.Tensor]:
    """The tensors a saved method keeps: its state dict less `rebuilt_keys` (CPU copies, no shared storage)."""
    skip = rebuilt_keys(method)
    return {name: tensor.detach().cpu().clone().contiguous() for name, tensor in method.state_dict().items()
            if name not in skip}


def save_method(method: SegmentationMethod, folder: str | Path, options: Mapping[str, Any],
                extra: Mapping[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Write `folder/method.json` and `folder/weights.safetensors` atomically; `options` are the build options."""
    folder = Path(folder)
    try:
        options_json = json.loads(json.dumps(dict(options)))
        extra_json = json.loads(json.dumps(dict(extra or {})))
    except TypeError as error:
        raise InputError(folder, f"the options of {method.name!r} are not JSON ({error})",
                         "Pass backbones by registry name or checkpoint path, not as built objects") from error
    config, weights = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not overwrite and (config.exists() or weights.exists()):
        raise OutputExistsError(folder, "a saved method is already there; pass overwrite=True or choose another "
                                        "folder")
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "medclipsam_version": __version__, "method": method.name,
            "concepts": list(method.concepts), "options": options_json,
            "trainable_parameters": method.trainable_parameters(), "extra": extra_json}
    state = method_state(method)
    atomic_write(weights, lambda temp: save_file(state, temp))
    atomic_write(config, lambda temp: Path(temp).write_text(json.dumps(meta, indent=2), encoding="utf-8"))
    return folder


def is_saved_method(folder: str | Path) -> bool:
    """True when `folder` holds a saved method's config file."""
    return (Path(folder) / CONFIG_FILE).is_file()


def read_method_config(folder: str | Path) -> dict[str, Any]:
    """The `method.json` of a saved method, checked for the keys loading needs."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise WeightsError(path, "file not found", f"a saved method folder holds {CONFIG_FILE} and {WEIGHTS_FILE} "
                                                   "(written by `medclipsam train --method NAME`)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        missing = [key for key in ("format", "method", "concepts", "options") if key not in meta]
    except (json.JSONDecodeError, TypeError) as error:
        raise WeightsError(path, f"not JSON ({error})", "re-save the method") from error
    if missing or meta["format"] != FORMAT:
        raise WeightsError(path, f"not a {FORMAT} config (missing {missing}, format {meta.get('format')!r})",
                           "re-save the method with this version of medclipsam")
    return meta


def load_method(folder: str | Path, device: str | torch.device = "cpu") -> SegmentationMethod:
    """Rebuild a saved method from its options and load its tensors; any key or shape mismatch is a WeightsError."""
    meta = read_method_config(folder)
    weights = Path(folder) / WEIGHTS_FILE
    if not weights.is_file():
        raise WeightsError(weights, "file not found", "the folder lost its weights; re-run the training")
    try:
        state = load_file(str(weights))
    except Exception as error:  # safetensors raises its own error types for truncated or foreign files
        raise WeightsError(weights, f"unreadable or truncated safetensors file ({error})", "re-save the method") \
            from error
    method = build_method(meta["method"], meta["concepts"], **meta["options"])
    own = method_state(method)
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(k for k in own if k in state and own[k].shape != state[k].shape)
    if missing or unexpected or mismatched:
        raise WeightsError(weights, f"does not fit {meta['method']!r} built from {CONFIG_FILE} (missing "
                                    f"{missing[:4]}, unexpected {unexpected[:4]}, shape mismatch {mismatched[:4]})",
                           "load it with the medclipsam version and backbones it was trained with")
    method.load_state_dict(state, strict=False)
    return method.to(device).eval()


def load_trained_method(folder: str | Path, concepts: Sequence[str],
                        device: str | torch.device = "cpu") -> SegmentationMethod:
    """Whatever training wrote to `folder`, in eval mode: a CLIP-Guided SAM adapter checkpoint (open vocabulary, so it
    answers for `concepts`) or a saved method (which keeps the vocabulary it was trained with)."""
    folder = Path(folder)
    if (folder / ADAPTER_WEIGHTS).is_file() or (folder / ADAPTER_CONFIG).is_file():
        return CLIPGuidedSAMMethod(concepts, model=load_model(folder, device=device)).eval()
    if not is_saved_method(folder):
        raise WeightsError(folder, f"no checkpoint here (expected {ADAPTER_WEIGHTS} + {ADAPTER_CONFIG} for CLIP-Guided "
                                   f"SAM, or {CONFIG_FILE} + {WEIGHTS_FILE} for another method)",
                           "point at the `model/` folder that training wrote (`medclipsam train` or the bundle)")
    return load_method(folder, device=device)
