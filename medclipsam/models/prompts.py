"""Spatial prompts for SAM, the mask/box geometry they are made of, and the prompts text-only mode derives from a
similarity map (no user input but the word)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from monai.transforms.utils import get_largest_connected_component_mask
from segment_anything.utils.amg import batched_mask_to_box


@dataclass
class SpatialPrompts:
    """Manual-mode prompts for N (image, concept) pairs, in model-input pixel coordinates (x, y)."""

    boxes: torch.Tensor | None = None  # (N, 4) x0, y0, x1, y1
    points: torch.Tensor | None = None  # (N, P, 2)
    point_labels: torch.Tensor | None = None  # (N, P): 1 foreground, 0 background, -1 padding

    def to(self, device: torch.device | str) -> "SpatialPrompts":
        """The same prompts on `device`."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return SpatialPrompts(move(self.boxes), move(self.points), move(self.point_labels))

    def select(self, index: torch.Tensor) -> "SpatialPrompts":
        """The prompts of the pairs at `index`."""
        pick = lambda t: None if t is None else t[index]  # noqa: E731
        return SpatialPrompts(pick(self.boxes), pick(self.points), pick(self.point_labels))

    @property
    def empty(self) -> bool:
        """True when there is no spatial prompt (text-only mode)."""
        return self.boxes is None and self.points is None

    def __len__(self) -> int:
        """Number of prompt sets (0 for text-only prompts)."""
        given = self.boxes if self.boxes is not None else self.points
        return 0 if given is None else len(given)


@dataclass
class SlicePrompts:
    """Manual prompts for B slices x K concepts in slice pixels (x, y): a box (NaN where none) and/or points
    (label -1 where none) per (slice, concept) pair."""

    boxes: torch.Tensor  # (B, K, 4)
    points: torch.Tensor  # (B, K, P, 2)
    point_labels: torch.Tensor  # (B, K, P): 1 on the organ, 0 off it, -1 padding

    @classmethod
    def empty(cls, slices: int, concepts: int, points: int = 1) -> "SlicePrompts":
        """No prompt anywhere yet, with room for `points` points per pair."""
        return cls(torch.full((slices, concepts, 4), float("nan")), torch.zeros(slices, concepts, points, 2),
                   torch.full((slices, concepts, points), -1, dtype=torch.int64))

    @classmethod
    def cat(cls, parts: list["SlicePrompts"]) -> "SlicePrompts":
        """Prompts of several slice batches (same concepts and point count) as one batch."""
        return cls(*(torch.cat([getattr(p, name) for p in parts]) for name in ("boxes", "points", "point_labels")))

    @property
    def active(self) -> torch.Tensor:
        """(B, K) bool: pairs with a box or at least one point."""
        return ~torch.isnan(self.boxes[..., 0]) | (self.point_labels >= 0).any(dim=-1)

    def groups(self) -> list[tuple[torch.Tensor, SpatialPrompts]]:
        """The active pairs (flat indices b * K + k) split by prompt kind (box, points, both), each with SAM
        prompts holding only what that kind has: SAM encodes a batch with boxes for all or for none."""
        boxed = ~torch.isnan(self.boxes[..., 0]).reshape(-1)
        pointed = (self.point_labels >= 0).any(dim=-1).reshape(-1)
        boxes, points = self.boxes.reshape(-1, 4), self.points.reshape(-1, *self.points.shape[2:])
        labels = self.point_labels.reshape(-1, self.point_labels.shape[-1])
        groups = []
        for has_box, has_points in ((True, False), (False, True), (True, True)):
            index = torch.nonzero((boxed == has_box) & (pointed == has_points)).flatten()
            if len(index):
                groups.append((index, SpatialPrompts(boxes[index] if has_box else None,
                                                     points[index] if has_points else None,
                                                     labels[index] if has_points else None)))
        return groups


def mask_box(masks: torch.Tensor) -> torch.Tensor:
    """Tight (x0, y0, x1, y1) pixel boxes around binary masks (..., H, W) -> (..., 4); an empty mask gives zeros."""
    return batched_mask_to_box(masks > 0.5).float()


def points_from_similarity(sim_logits: torch.Tensor, count: int, image_size: int) -> SpatialPrompts:
    """The `count` most similar locations per pair as points: positive where probability > 0.5, padding elsewhere."""
    n, h, w = sim_logits.shape
    top = sim_logits.reshape(n, -1).topk(count, dim=1)
    ys = (top.indices // w).float()
    xs = (top.indices % w).float()
    coords = torch.stack([(xs + 0.5) * image_size / w, (ys + 0.5) * image_size / h], dim=-1)
    labels = torch.where(top.values > 0, 1, -1).to(torch.int64)
    return SpatialPrompts(points=coords, point_labels=labels)


def largest_component(mask: np.ndarray, connectivity: int = 1) -> np.ndarray:
    """The largest connected component of a boolean mask (connectivity: neighbour hops, 1 = faces only); all False
    when the mask is empty."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return mask.copy()
    return np.asarray(get_largest_connected_component_mask(mask, connectivity=connectivity), dtype=bool)


def boxes_from_similarity(sim_logits: torch.Tensor, image_size: int, margin: int = 1
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pair, the box around the largest region of the similarity map with probability > 0.5, grown by `margin`
    grid cells, in model-input pixels: (boxes (N, 4), found (N,) bool). Pairs with no such region get a
    whole-image box and found=False (the concept is taken to be absent)."""
    n, h, w = sim_logits.shape
    masks = (sim_logits.detach() > 0).cpu().numpy()
    boxes = torch.tensor([[0.0, 0.0, image_size - 1.0, image_size - 1.0]]).repeat(n, 1)
    found = torch.zeros(n, dtype=torch.bool)
    cell_x, cell_y = image_size / w, image_size / h
    for index, mask in enumerate(masks):
        region = largest_component(mask)
        if not region.any():
            continue
        ys, xs = np.nonzero(region)
        x0, x1 = max(xs.min() - margin, 0), min(xs.max() + margin, w - 1)
        y0, y1 = max(ys.min() - margin, 0), min(ys.max() + margin, h - 1)
        boxes[index] = torch.tensor([x0 * cell_x, y0 * cell_y, (x1 + 1) * cell_x - 1, (y1 + 1) * cell_y - 1])
        found[index] = True
    return boxes.to(sim_logits.device), found.to(sim_logits.device)
