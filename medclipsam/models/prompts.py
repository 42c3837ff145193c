"""Spatial prompts for SAM, and the ones text-only mode derives from a similarity map (no user input but the word)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage


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
    """The largest connected component of a 2D boolean mask (connectivity 1: 4-neighbours, 2: 8-neighbours); all
    False if the mask is empty."""
    components, count = ndimage.label(mask, structure=ndimage.generate_binary_structure(2, connectivity))
    if count == 0:
        return np.zeros_like(mask, dtype=bool)
    sizes = np.bincount(components.ravel())[1:]
    return components == int(np.argmax(sizes)) + 1


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
