"""The interface every segmentation method implements, its registry, and volume inference shared by all of them.

A method works on 2D slice items (`medclipsam.data.slices.slice_items`): images (3, S, S) in [0, 1] and binary masks
per concept. It is trained by `fit` on labelled items (and unlabelled ones, for semi-supervised methods) within a
budget of optimisation steps, and predicts per-concept probabilities with `predict`. Settings:
"text" (the concept name only) and "manual" (the concept plus a box per (slice, concept)).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping, Sequence

import torch
from torch import nn

from medclipsam.data.concepts import ConceptCard
from medclipsam.data.slices import from_model_size, label_plane, reassemble, to_model_size, volume_slices
from medclipsam.inference.cleanup import clean_label_map
from medclipsam.training.prompt_simulation import mask_box

SETTINGS = ("text", "manual")


@dataclass
class TrainBudget:
    """What every method gets for a fair comparison: the same number of steps, slices per step and seed."""

    steps: int = 200
    slices_per_step: int = 2
    seed: int = 0


class SegmentationMethod(nn.Module, ABC):
    """A trainable 2D segmentation method over a card's concepts (closed-vocabulary methods use their order)."""

    name: ClassVar[str]
    settings: ClassVar[tuple[str, ...]]  # which of SETTINGS it supports
    image_size: int = 256  # model input size S of the slice items it expects

    def __init__(self, concepts: Sequence[str]) -> None:
        super().__init__()
        self.concepts = list(concepts)

    def class_index(self, concepts: Sequence[str]) -> torch.Tensor:
        """Indices of `concepts` in this method's vocabulary (closed-vocabulary methods)."""
        unknown = [c for c in concepts if c not in self.concepts]
        if unknown:
            raise KeyError(f"{self.name}: concepts {unknown} are not in its vocabulary {self.concepts}")
        return torch.tensor([self.concepts.index(c) for c in concepts])

    @abstractmethod
    def fit(self, labelled: Sequence[dict], unlabelled: Sequence[dict], budget: TrainBudget,
            progress: Callable[[str], None] | None = None) -> list[dict[str, float]]:
        """Train on slice items within `budget`; returns per-step loss terms."""

    @abstractmethod
    def predict(self, images: torch.Tensor, concepts: Sequence[str],
                boxes: torch.Tensor | None = None) -> torch.Tensor:
        """(B, K, S, S) probabilities for images (B, 3, S, S) and K concepts; boxes (B, K, 4) in pixels, manual only."""

    def refuse_boxes(self, boxes: torch.Tensor | None) -> None:
        """Raise when boxes are given to a method that has no manual setting (it would silently ignore them)."""
        if boxes is not None and "manual" not in self.settings:
            raise ValueError(f"{self.name} supports the text setting only; it takes no boxes")

    def trainable_parameters(self) -> int:
        """Number of parameters that training changes."""
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values() if p.requires_grad)

    @property
    def device(self) -> torch.device:
        """Device of the method's parameters (CPU when it has none)."""
        first = next(self.parameters(), None)
        return first.device if first is not None else torch.device("cpu")


def report_step(progress: Callable[[str], None] | None, name: str, step: int, steps: int,
                terms: Mapping[str, float]) -> None:
    """Send every tenth step's (and the last step's) loss terms of method `name` to `progress`."""
    if progress and (step % 10 == 0 or step == steps):
        progress(f"{name}: step {step}/{steps} " + " ".join(f"{term} {value:.4f}" for term, value in terms.items()))


_REGISTRY: dict[str, Callable[..., SegmentationMethod]] = {}


def register_method(name: str) -> Callable[[Callable[..., SegmentationMethod]], Callable[..., SegmentationMethod]]:
    """Decorator: make a method builder available to `build_method(name, ...)`."""

    def add(builder: Callable[..., SegmentationMethod]) -> Callable[..., SegmentationMethod]:
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} is registered twice")
        _REGISTRY[name] = builder
        return builder

    return add


def _load_builtin_methods() -> None:
    import importlib
    import pkgutil

    import medclipsam.methods as package

    for module in pkgutil.iter_modules(package.__path__):
        if module.name != "base":
            importlib.import_module(f"medclipsam.methods.{module.name}")


def available_methods() -> list[str]:
    """Names accepted by `build_method`."""
    _load_builtin_methods()
    return sorted(_REGISTRY)


def build_method(name: str, concepts: Sequence[str], **options: Any) -> SegmentationMethod:
    """A method by registry name, over the given concept names, with its own options."""
    _load_builtin_methods()
    if name not in _REGISTRY:
        raise KeyError(f"unknown method {name!r}; available: {sorted(_REGISTRY)}")
    return _REGISTRY[name](concepts, **options)


def oracle_boxes(label_plane: torch.Tensor, label_ids: Sequence[int], size: int) -> torch.Tensor:
    """(K, 4) manual-mode boxes at model size from a slice's truth; an absent concept gets an all-zero box."""
    boxes = torch.zeros(len(label_ids), 4)
    for k, label_id in enumerate(label_ids):
        mask = (label_plane == label_id).float()
        if mask.any():
            boxes[k] = mask_box(to_model_size(mask[None], size, "nearest-exact")[0][0])
    return boxes


@torch.no_grad()
def segment_case(method: SegmentationMethod, case: Mapping[str, Any], card: ConceptCard, setting: str = "text",
                 axis: int = 2, batch_size: int = 8, threshold: float = 0.5, cleanup: bool = True) -> torch.Tensor:
    """Label volume (X, Y, Z) of a loaded case (`load_case`), slice by slice, every concept of the card; `cleanup`
    applies the same 3D clean-up as `medclipsam segment` (`medclipsam.inference.cleanup`) to every method.

    "manual" takes each box from the case's truth (oracle boxes; concepts absent from a slice are not prompted).
    Overlaps go to the most probable concept.
    """
    if setting not in method.settings:
        raise ValueError(f"{method.name} does not support the {setting!r} setting (it supports {method.settings})")
    method.eval()
    ids = sorted(card.concepts)
    names = [card.concepts[i].name for i in ids]
    label = case.get("label")
    slices = list(volume_slices(case["image"], axis=axis, size=method.image_size))
    predictions: dict[int, torch.Tensor] = {}
    for start in range(0, len(slices), batch_size):
        chunk = slices[start:start + batch_size]
        images = torch.stack([s[1] for s in chunk]).to(method.device)
        boxes = None
        if setting == "manual":
            if label is None:
                raise ValueError("the manual setting takes oracle boxes from the case's label, and it has none")
            boxes = torch.stack([oracle_boxes(label_plane(label, axis, index), ids, method.image_size)
                                 for index, _, _ in chunk]).to(method.device)
        probs = method.predict(images, names, boxes).float().cpu()
        if boxes is not None:
            probs = probs * (boxes.cpu().abs().sum(-1) > 0)[..., None, None]
        for (index, _, geometry), slice_probs in zip(chunk, probs):
            predictions[index] = _labels_from_probs(from_model_size(slice_probs, geometry), ids, threshold)
    labels = reassemble(predictions, tuple(case["image"].shape[1:]), axis=axis)
    if cleanup:
        labels = torch.from_numpy(clean_label_map(labels.numpy(), dict(zip(ids, names)), axis=axis))
    return labels


def _labels_from_probs(probs: torch.Tensor, ids: Sequence[int], threshold: float) -> torch.Tensor:
    best, index = probs.max(dim=0)
    labels = torch.as_tensor(ids, dtype=torch.uint8)[index]
    return torch.where(best > threshold, labels, torch.zeros_like(labels))
