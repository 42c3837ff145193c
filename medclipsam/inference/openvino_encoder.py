"""A model's frozen image path (SAM encoder trunk and bare embedding) on OpenVINO, for CPU inference: converted once
per weights and machine, cached on disk, compiled in the precision the predictor runs a view in (bfloat16 under AMP on
a CPU with AMX, else float32). PyTorch stays the reference path; the two agree within a tolerance
(`tests/test_openvino_encoder.py`). Measured on 2 Xeon cores: `segment` with 5 organs on a 300-slice CT in 110 s
instead of 139 s with PyTorch's encoder (benchmarks/segment_speed.py).
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medclipsam.errors import InputError

CACHE_ENV = "MEDCLIPSAM_CACHE"  # root of medclipsam's caches; default $XDG_CACHE_HOME/medclipsam or ~/.cache/medclipsam
RUNTIMES = ("auto", "torch", "openvino")
AUTO_SLICES = 64  # "auto" takes OpenVINO for at least this many slices to encode, where its one-time conversion
# (12-14 s for LiteMedSAM on 2 quiet cores, ~40 s on busy ones) has surely paid back; a scan's runtime never depends on
# the cache's state, so the same scan gives the same masks on a fresh machine and an old one


def openvino_available() -> bool:
    """True when the openvino package can be imported."""
    return importlib.util.find_spec("openvino") is not None


def cache_root() -> Path:
    """Where converted encoders are kept: $MEDCLIPSAM_CACHE/openvino, else the user's cache folder."""
    root = os.environ.get(CACHE_ENV) or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "medclipsam"
    return Path(root) / "openvino"


def weights_key(module: nn.Module, image_size: int) -> str:
    """A digest of what the converted graph depends on: the module's tensors, input size and library versions."""
    import openvino

    digest = hashlib.sha256(f"{image_size}|{openvino.__version__}|{torch.__version__}".encode())
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:24]


def ir_path(module: nn.Module, image_size: int, cache: Path | None = None) -> Path:
    """Where the converted IR of `module` is (or will be) kept."""
    return (cache or cache_root()) / weights_key(module, image_size) / "model.xml"


def converted_path(module: nn.Module, image_size: int, cache: Path | None = None) -> Path:
    """The OpenVINO IR (`model.xml`) of `module` for one (1, 3, S, S) image, converted now unless already cached;
    the folder appears whole (written beside it, then renamed). One image per call: TinyViT's reshapes fix the batch
    size in the traced graph."""
    import openvino

    target = ir_path(module, image_size, cache)
    folder = target.parent
    if target.is_file():
        return target
    folder.parent.mkdir(parents=True, exist_ok=True)
    example = torch.rand(1, 3, image_size, image_size)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on Python-side shape checks
        converted = openvino.convert_model(module.eval(), example_input=example)
    temp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        openvino.save_model(converted, temp / "model.xml", compress_to_fp16=False)
        try:
            temp.rename(folder)
        except OSError:  # another process got there first: its copy is as good
            if not target.is_file():
                raise
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return target


class OpenVINOImagePath:
    """Runs a model's frozen image path (`model.frozen_image_path()`) on OpenVINO: images -> (trunk, bare)."""

    def __init__(self, model: Any, cache: Path | None = None) -> None:
        import openvino

        module = model.frozen_image_path()
        self.image_size = int(model.image_size)
        self.xml = converted_path(module, self.image_size, cache)
        self.core = openvino.Core()  # no compiled-blob cache: reloaded bfloat16 blobs gave NaNs (OpenVINO 2026.4)
        self._compiled: dict[str, Any] = {}

    def _compiled_for(self, precision: torch.dtype | None) -> Any:
        hint = "bf16" if precision == torch.bfloat16 else "f32"
        if hint not in self._compiled:
            self._compiled[hint] = self.core.compile_model(str(self.xml), "CPU", {
                "INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": torch.get_num_threads()})
        return self._compiled[hint]

    def __call__(self, images: torch.Tensor, precision: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(trunk, bare) float32 tensors for (B, 3, S, S) images in [0, 1]; `precision` bfloat16 or None (float32)."""
        compiled = self._compiled_for(precision)
        results = [compiled(image[None].float().contiguous().numpy()) for image in images]
        trunk, bare = (torch.from_numpy(np.concatenate([r[i] for r in results])) for i in range(2))
        return trunk, bare


def encode_slices(model: Any, images: torch.Tensor, image_path: OpenVINOImagePath | None,
                  precision: torch.dtype | None = None) -> Any:
    """The model's encodings of `images`: its own `encode` (PyTorch) when `image_path` is None, else its frozen image
    path run by `image_path` (OpenVINO, in `precision`) and finished by `model.features`."""
    return model.encode(images) if image_path is None else model.features(images, *image_path(images, precision))


def check_runtime(runtime: str) -> str:
    """`runtime` when it names one, else a clear error."""
    if runtime not in RUNTIMES:
        raise InputError(None, f"runtime {runtime!r} is not one of {', '.join(RUNTIMES)}",
                         "use auto (OpenVINO on a CPU when available), torch or openvino")
    return runtime


def image_path_runtime(model: Any, device: torch.device, runtime: str = "auto", slices: int = 0,
                       cache: Path | None = None) -> OpenVINOImagePath | None:
    """The OpenVINO image path for `model` on `device`, or None to encode with PyTorch. "auto": OpenVINO on a CPU
    when it is installed, the model exposes a frozen image path and there are at least AUTO_SLICES `slices` to
    encode; "openvino": OpenVINO or a clear error; "torch": always None."""
    usable = device.type == "cpu" and hasattr(model, "frozen_image_path")
    if check_runtime(runtime) == "torch" or (runtime == "auto" and not (usable and openvino_available())):
        return None
    if runtime == "auto" and slices < AUTO_SLICES:
        return None
    if not usable:
        raise InputError(None, f"the OpenVINO runtime needs a CPU device and a model with a frozen image path "
                               f"(device {device}, model {type(model).__name__})",
                         "use --runtime torch (or auto) for this model or device")
    if not openvino_available():
        raise InputError(None, "the OpenVINO runtime was asked for but openvino is not installed",
                         "pip install openvino, or use --runtime torch")
    return OpenVINOImagePath(model, cache)
