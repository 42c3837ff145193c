"""Segment a slice or a volume by concept names with a CLIP-Guided SAM (text-only, or manual with boxes/points).

Volumes are cut into slices along one axis; each batch of slices goes through the frozen encoder trunk once and every
concept shares it. Where concepts overlap, a voxel goes to the most probable one.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from monai.data import MetaTensor

from medclipsam.data.slices import (
    SliceGeometry, from_model_size, label_plane, reassemble, to_model_size, volume_slices,
)
from medclipsam.errors import InputError
from medclipsam.inference.cleanup import clean_label_map
from medclipsam.models.clip_guided_sam import CLIPGuidedSAM
from medclipsam.models.prompts import SpatialPrompts
from medclipsam.training.prompt_simulation import mask_box

Box3D = Sequence[float]  # (x0, y0, z0, x1, y1, z1) voxel indices of the RAS volume, inclusive


@dataclass
class SliceSegmentation:
    """Per concept, at the slice's own size: masks (K, H, W) bool, probabilities, and predicted IoU (confidence)."""

    concepts: list[str]
    masks: torch.Tensor
    probabilities: torch.Tensor
    confidence: torch.Tensor


@dataclass
class VolumeSegmentation:
    """A label map on the input volume's grid (its affine kept), with the value of each concept and its confidence
    (mean predicted IoU over the slices where it was found; NaN when never found)."""

    labels: torch.Tensor  # (X, Y, Z) uint8, voxel order of the input volume
    label_values: dict[str, int]
    confidence: dict[str, float]
    affine: torch.Tensor | None = None
    slice_range: dict[str, tuple[int, int] | None] = field(default_factory=dict)

    def as_metatensor(self) -> MetaTensor:
        """Channel-first (1, X, Y, Z) MetaTensor with the input's affine (for `medclipsam.data.io.save_mask`)."""
        return MetaTensor(self.labels[None], affine=self.affine)


def _as_slice_image(image: torch.Tensor | np.ndarray) -> torch.Tensor:
    tensor = torch.as_tensor(np.asarray(image) if not isinstance(image, torch.Tensor) else image).float()
    if tensor.ndim == 2:
        tensor = tensor[None]
    if tensor.ndim != 3 or tensor.shape[0] not in (1, 3):
        raise InputError(None, f"a slice must be (H, W), (1, H, W) or (3, H, W); got shape {tuple(tensor.shape)}",
                         "pass one 2D slice, or a volume (1, X, Y, Z) to segment_volume")
    if tensor.min() < -1e-3 or tensor.max() > 1 + 1e-3:
        raise InputError(None, f"slice intensities span [{float(tensor.min()):.3g}, {float(tensor.max()):.3g}], "
                         "expected [0, 1]", "window CT with medclipsam.data.intensity.CTWindow (or scale to [0, 1])")
    return tensor


def _scale_xy(values: torch.Tensor, geometry: SliceGeometry) -> torch.Tensor:
    """Slice pixel (x, y) coordinates → model-input pixels (the resize keeps the aspect ratio)."""
    scale = geometry.resized_width / geometry.width
    return values.float() * scale


def concept_probabilities(model: CLIPGuidedSAM, images: torch.Tensor, concepts: Sequence[str], prompts: SpatialPrompts | None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, K, S, S) probabilities and (B, K) confidence for B model-size images and K concepts."""
    batch, count = images.shape[0], len(concepts)
    features = model.encode_image(images.to(model.device))
    text = model.encode_concepts(concepts)
    image_index = torch.arange(batch, device=model.device).repeat_interleave(count)
    dense = model.dense_features(features)[image_index]  # once per image, shared by its concepts
    out = model.decode(features.select(image_index), text.repeat(batch, 1), prompts, dense=dense)
    logits = torch.nn.functional.interpolate(out.mask_logits[:, None].float(), size=images.shape[-2:],
                                             mode="bilinear", align_corners=False)
    return torch.sigmoid(logits).view(batch, count, *images.shape[-2:]).cpu(), out.iou.float().view(batch, count).cpu()


@torch.no_grad()
def segment_slice(model: CLIPGuidedSAM, image: torch.Tensor | np.ndarray, concepts: Sequence[str],
                  boxes: torch.Tensor | None = None, points: torch.Tensor | None = None,
                  point_labels: torch.Tensor | None = None, threshold: float = 0.5) -> SliceSegmentation:
    """One 2D slice in [0, 1] and K concept names; optional boxes (K, 4) x0, y0, x1, y1 and points (K, P, 2) in the
    slice's own pixel coordinates (manual mode). Without them, text-only mode."""
    model.eval()
    model_size = model.sam.image_size
    slice_image = _as_slice_image(image)
    resized, geometry = to_model_size(slice_image, model_size)
    prompts = SpatialPrompts(
        boxes=None if boxes is None else _scale_xy(torch.as_tensor(boxes), geometry).to(model.device),
        points=None if points is None else _scale_xy(torch.as_tensor(points), geometry).to(model.device),
        point_labels=None if points is None else (
            torch.ones(torch.as_tensor(points).shape[:2], dtype=torch.int64) if point_labels is None
            else torch.as_tensor(point_labels)
        ).to(model.device),
    )
    probs, confidence = concept_probabilities(model, resized.expand(3, -1, -1)[None], list(concepts), prompts)
    probs = from_model_size(probs[0], geometry)
    return SliceSegmentation(list(concepts), probs > threshold, probs, confidence[0])


def _slice_boxes(boxes: Mapping[str, Box3D], concepts: Sequence[str], shape: Sequence[int], axis: int,
                 size: int) -> dict[int, torch.Tensor]:
    """Manual mode for volumes: per slice index, (K, 4) model-size boxes (all -1 where a concept has no box there)."""
    per_slice: dict[int, torch.Tensor] = {}
    for k, concept in enumerate(concepts):
        if concept not in boxes:
            raise InputError(None, f"manual mode needs a box for every concept; {concept!r} has none",
                             "give a box per prompt, or leave boxes out for text-only mode")
        x0, y0, z0, x1, y1, z1 = (int(round(v)) for v in boxes[concept])
        region = torch.zeros(1, *(int(n) for n in shape), dtype=torch.uint8)
        region[0, max(x0, 0):x1 + 1, max(y0, 0):y1 + 1, max(z0, 0):z1 + 1] = 1
        lo, hi = (x0, y0, z0)[axis], (x1, y1, z1)[axis]
        for index in range(max(lo, 0), min(hi, shape[axis] - 1) + 1):
            plane = to_model_size(label_plane(region, axis, index)[None].float(), size, "nearest-exact")[0][0]
            if plane.any():
                per_slice.setdefault(index, torch.full((len(concepts), 4), -1.0))[k] = mask_box(plane)
    return per_slice


@torch.no_grad()
def segment_volume(model: CLIPGuidedSAM, volume: torch.Tensor, concepts: Sequence[str],
                   boxes: Mapping[str, Box3D] | None = None, axis: int = 2, batch_size: int = 8,
                   threshold: float = 0.5, progress: Callable[[int, int], None] | None = None,
                   cleanup: bool = True) -> VolumeSegmentation:
    """A (1, X, Y, Z) volume in [0, 1] (RAS, e.g. `load_case(...)["image"]`) and K concept names → label map.

    Manual mode: `boxes` maps each concept to a 3D voxel box; slices outside a concept's box are not prompted for it.
    `cleanup` applies `medclipsam.inference.cleanup.clean_mask` to each concept (isolated slices dropped, largest
    3D component for single-piece anatomy, holes filled where nothing else was predicted).
    """
    model.eval()
    size = model.sam.image_size
    if volume.ndim != 4 or volume.shape[0] != 1:
        raise InputError(None, f"a volume must be (1, X, Y, Z); got shape {tuple(volume.shape)}",
                         "load it with medclipsam.data.slices.load_case or add the channel dimension")
    concepts = list(concepts)
    shape = tuple(int(n) for n in volume.shape[1:])
    slice_boxes = None if boxes is None else _slice_boxes(boxes, concepts, shape, axis, size)
    slices = [s for s in volume_slices(volume, axis=axis, size=size) if slice_boxes is None or s[0] in slice_boxes]
    values = list(range(1, len(concepts) + 1))
    predictions: dict[int, torch.Tensor] = {}
    slice_confidence: dict[int, torch.Tensor] = {}
    for start in range(0, len(slices), batch_size):
        chunk = slices[start:start + batch_size]
        images = torch.stack([s[1] for s in chunk])
        prompts, active = None, None
        if slice_boxes is not None:
            chunk_boxes = torch.stack([slice_boxes[index] for index, _, _ in chunk])  # (B, K, 4)
            active = chunk_boxes[..., 0] >= 0
            prompts = SpatialPrompts(boxes=chunk_boxes.clamp(min=0).view(-1, 4).to(model.device))
        probs, confidence = concept_probabilities(model, images, concepts, prompts)
        if active is not None:
            probs = probs * active[..., None, None]
        for (index, _, geometry), slice_probs, slice_conf in zip(chunk, probs, confidence):
            restored = from_model_size(slice_probs, geometry)
            best, which = restored.max(dim=0)
            labels = torch.where(best > threshold, torch.tensor(values, dtype=torch.uint8)[which],
                                 torch.zeros_like(which, dtype=torch.uint8))
            predictions[index] = labels
            slice_confidence[index] = slice_conf
        if progress:
            progress(min(start + batch_size, len(slices)), len(slices))
    labels = reassemble(predictions, shape, axis=axis) if predictions else torch.zeros(shape, dtype=torch.uint8)
    labels = labels.to(torch.uint8).numpy()
    if cleanup:
        labels = clean_label_map(labels, dict(zip(values, concepts)), axis=axis)
    affine = getattr(volume, "affine", None)
    confidence, slice_range = {}, {}
    for k, concept in enumerate(concepts):
        present = np.flatnonzero((labels == values[k]).any(axis=tuple(a for a in range(3) if a != axis)))
        slice_range[concept] = (int(present[0]), int(present[-1])) if present.size else None
        scores = [float(slice_confidence[int(i)][k]) for i in present if int(i) in slice_confidence]
        confidence[concept] = float(np.mean(scores)) if scores else float("nan")
    return VolumeSegmentation(
        labels=torch.from_numpy(labels),
        label_values=dict(zip(concepts, values)),
        confidence=confidence,
        affine=None if affine is None else torch.as_tensor(affine),
        slice_range=slice_range,
    )

