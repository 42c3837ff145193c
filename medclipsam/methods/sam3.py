"""SAM 3 (Meta, "Segment Anything with Concepts") behind the method interface: zero-shot concept-prompt inference.

Optional: it needs the `sam3` package (https://github.com/facebookresearch/sam3, not on PyPI) and its gated
checkpoint (`sam3.pt` from https://huggingface.co/facebook/sam3 after accepting the licence), passed as
`checkpoint=`. Without either, building the method raises a `WeightsError` that says what to install or pass; it
never falls back to anything else. Nothing is downloaded (`load_from_HF=False`).

Per slice and concept: text setting, the concept name as SAM 3's text prompt, every instance it keeps (score above
`confidence_threshold`) merged by a per-pixel maximum of their mask probabilities; manual setting, the box is added
as a positive geometric prompt with the text and the instance that overlaps the box best is kept. Nothing trains.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from medclipsam.errors import WeightsError
from medclipsam.methods.base import SETTINGS, SegmentationMethod
from medclipsam.training.loop import TrainBudget

INSTALL_HINT = ("install it with `pip install git+https://github.com/facebookresearch/sam3` and download sam3.pt "
                "from https://huggingface.co/facebook/sam3 (gated: accept the licence first)")


def sam3_available() -> bool:
    """True when the `sam3` package can be imported."""
    return importlib.util.find_spec("sam3") is not None


def build_sam3_processor(checkpoint: str | Path | None, device: str = "cpu", confidence_threshold: float = 0.5,
                         bpe_path: str | None = None) -> Any:
    """SAM 3's image model and `Sam3Processor` from a local checkpoint; a WeightsError says what is missing."""
    if not sam3_available():
        raise WeightsError("sam3", "the sam3 package is not installed", f"To use the sam3 method, {INSTALL_HINT}")
    if checkpoint is None:
        raise WeightsError("sam3", "no checkpoint given", f"Pass checkpoint='/path/to/sam3.pt'; {INSTALL_HINT}")
    path = Path(checkpoint)
    if not path.is_file():
        raise WeightsError(path, "file not found", f"Pass checkpoint= the path of SAM 3's sam3.pt; {INSTALL_HINT}")
    from sam3.model.sam3_image_processor import Sam3Processor
    from sam3.model_builder import build_sam3_image_model

    model = build_sam3_image_model(bpe_path=bpe_path, device=device, checkpoint_path=str(path), load_from_HF=False)
    return Sam3Processor(model, device=device, confidence_threshold=confidence_threshold)


def box_to_sam3(box: torch.Tensor, size: tuple[int, int]) -> list[float]:
    """A pixel (x0, y0, x1, y1) box as SAM 3's geometric prompt: (cx, cy, w, h) normalised by (width, height)."""
    height, width = size
    x0, y0, x1, y1 = (float(v) for v in box)
    return [(x0 + x1 + 1) / 2 / width, (y0 + y1 + 1) / 2 / height, (x1 - x0 + 1) / width, (y1 - y0 + 1) / height]


def merged_probability(state: dict, size: tuple[int, int], box: torch.Tensor | None = None) -> torch.Tensor:
    """(H, W) probability from a SAM 3 result: the per-pixel maximum over its instances, or with `box` the instance
    whose box overlaps it best (IoU); zeros when SAM 3 kept no instance."""
    probs = state.get("masks_logits")
    if probs is None or len(probs) == 0:
        return torch.zeros(size)
    probs = torch.as_tensor(probs).float().reshape(len(probs), *size).cpu()
    if box is None:
        return probs.amax(dim=0)
    found = torch.as_tensor(state["boxes"]).float().reshape(-1, 4).cpu()
    lo = torch.maximum(found[:, :2], box[:2])
    hi = torch.minimum(found[:, 2:], box[2:])
    overlap = (hi - lo).clamp(min=0).prod(dim=1)
    areas = (found[:, 2:] - found[:, :2]).clamp(min=0).prod(dim=1) + (box[2:] - box[:2]).clamp(min=0).prod()
    iou = overlap / (areas - overlap).clamp(min=1e-6)
    return probs[int(iou.argmax())] if bool(iou.max() > 0) else torch.zeros(size)


class _Session:
    """Holds SAM 3's processor outside the module tree: its ~850M frozen weights are not this method's state."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor


class Sam3Method(SegmentationMethod):
    """Zero-shot SAM 3 concept segmentation of each slice (see the module docstring); `fit` trains nothing.

    `processor` is an already built `Sam3Processor` (or any object with its `set_image`, `set_text_prompt`,
    `add_geometric_prompt` and `reset_all_prompts`); otherwise one is built from `checkpoint` on `device`.
    `image_size` is the slice size S the comparison slices at (SAM 3 resizes internally).
    """

    name = "sam3"
    settings = SETTINGS

    def __init__(self, concepts: Sequence[str], checkpoint: str | None = None, device: str = "auto",
                 confidence_threshold: float = 0.5, bpe_path: str | None = None, image_size: int = 256,
                 processor: Any = None) -> None:
        super().__init__(concepts)
        if processor is None:
            if device == "auto":
                device = "cuda" if torch.cuda.is_available() else "cpu"
            processor = build_sam3_processor(checkpoint, device, confidence_threshold, bpe_path)
        self.session = _Session(processor)
        self.image_size = int(image_size)

    def fit(self, labelled: Sequence[dict], unlabelled: Sequence[dict], budget: TrainBudget,
            progress: Callable[[str], None] | None = None, work_dir: Path | None = None) -> list[dict[str, float]]:
        """Zero-shot: nothing to learn, no steps taken."""
        if progress:
            progress("sam3: zero-shot, nothing to fit")
        return []

    @torch.no_grad()
    def predict(self, images: torch.Tensor, concepts: Sequence[str],
                boxes: torch.Tensor | None = None) -> torch.Tensor:
        """(B, K, S, S) probabilities: the concept name as text prompt, plus the box (B, K, 4) in the manual setting
        (an all-zero box predicts nothing)."""
        processor = self.session.processor
        batch, count, size = images.shape[0], len(concepts), tuple(images.shape[-2:])
        if boxes is not None and tuple(boxes.shape) != (batch, count, 4):
            raise ValueError(f"boxes must be (B, K, 4) = ({batch}, {count}, 4), got {tuple(boxes.shape)}")
        out = torch.zeros(batch, count, *size)
        for b, image in enumerate(images):
            pixels = (image.float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
            state = processor.set_image(Image.fromarray(np.ascontiguousarray(pixels)))
            for k, concept in enumerate(concepts):
                box = None if boxes is None else boxes[b, k].float().cpu()
                if box is not None and not bool(box.abs().sum() > 0):
                    continue
                processor.reset_all_prompts(state)
                state = processor.set_text_prompt(concept, state)
                if box is not None:
                    state = processor.add_geometric_prompt(box_to_sam3(box, size), True, state)
                out[b, k] = merged_probability(state, size, box)
        return out.to(images.device)

