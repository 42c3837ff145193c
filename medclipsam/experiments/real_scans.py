"""Real-scan checks: the real abdominal CT re-gridded as other scanners would have acquired it (a large field of view
at 0.8 mm with a table, or thick slices), and manual mode against the bare backbone it wraps (LiteMedSAM as users
run it: each slice windowed, resized by its longest side to 256, the same box on every slice)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from medclipsam.data.intensity import window_bounds
from medclipsam.models.sam import SamBackbone

Box3D = tuple[int, int, int, int, int, int]


@dataclass
class Scan:
    """A volume in HU with its label map and RAS affine (voxel order RAS)."""

    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray


def regrid(scan: Scan, spacing: Sequence[float], shape: Sequence[int], offset_mm: Sequence[float] = (0.0, 0.0),
           table_hu: float | None = 200.0) -> Scan:
    """The scan resampled (linear; labels nearest) onto a grid of `shape` voxels of `spacing` mm centred on the
    scan's centre moved by `offset_mm`; outside it, air, and with `table_hu` a 15 mm table slab 10 mm below the
    body (a larger field of view shows the table the original crop left out)."""
    source_spacing = np.linalg.norm(scan.affine[:3, :3], axis=0)
    centre_mm = (np.asarray(scan.image.shape) - 1) / 2 * source_spacing
    start_mm = centre_mm - (np.asarray(shape) - 1) / 2 * np.asarray(spacing)
    start_mm[:2] -= np.asarray(offset_mm, dtype=float)
    axes = [(start_mm[d] + np.arange(shape[d]) * spacing[d]) / source_spacing[d] for d in range(3)]
    coords = np.stack(np.meshgrid(*axes, indexing="ij"))
    image = ndimage.map_coordinates(scan.image.astype(np.float32), coords, order=1, mode="constant", cval=-1024.0)
    label = ndimage.map_coordinates(scan.label, coords, order=0, mode="constant", cval=0)
    if table_hu is not None:
        body_y = np.nonzero((image > -500).any(axis=(0, 2)))[0]
        below = int(body_y.min() - round(10.0 / spacing[1]))
        image[:, max(0, below - int(round(15.0 / spacing[1]))):max(0, below), :] = table_hu
    affine = np.diag([*map(float, spacing), 1.0])
    affine[:3, 3] = scan.affine[:3, :3] @ (start_mm / source_spacing) + scan.affine[:3, 3]
    return Scan(image.astype(np.int16), label.astype(np.int16), affine)


def truth_boxes(label: np.ndarray, values: Mapping[str, int]) -> dict[str, Box3D]:
    """Each named structure's inclusive 3D voxel box in `label` (structures absent from it are left out)."""
    boxes = {}
    for name, value in values.items():
        where = np.nonzero(label == value)
        if where[0].size:
            boxes[name] = tuple(int(v) for v in (*(w.min() for w in where), *(w.max() for w in where)))
    return boxes


@torch.no_grad()
def backbone_box_masks(backbone: SamBackbone, image_hu: np.ndarray, boxes: Mapping[str, Box3D],
                       window: str = "abdomen") -> dict[str, np.ndarray]:
    """The bare backbone's masks of an (X, Y, Z) volume for 3D boxes: per slice the in-plane rectangle of each box
    crossing it, on the slice windowed, resized by its longest side to the backbone's size and padded (one encoder
    pass per slice)."""
    low, high = window_bounds(window)
    size = backbone.image_size
    masks = {name: np.zeros(image_hu.shape, bool) for name in boxes}
    for z in range(image_hu.shape[2]):
        names = [name for name, box in boxes.items() if box[2] <= z <= box[5]]
        if not names:
            continue
        plane = (np.clip(image_hu[..., z], low, high) - low) / (high - low)
        rows, columns = plane.shape
        scale = size / max(rows, columns)
        resized = (int(rows * scale + 0.5), int(columns * scale + 0.5))
        pixels = F.interpolate(torch.tensor(plane, dtype=torch.float32)[None, None], resized, mode="bilinear",
                               align_corners=False)
        pixels = F.pad(pixels, (0, size - resized[1], 0, size - resized[0])).repeat(1, 3, 1, 1)
        prompts = torch.tensor([[boxes[n][1], boxes[n][0], boxes[n][4], boxes[n][3]] for n in names],
                               dtype=torch.float32) * scale  # (column = y, row = x) of the array as stored
        sparse, dense = backbone.prompt_encoder(points=None, boxes=prompts, masks=None)
        logits, _ = backbone.mask_decoder(backbone.encode(pixels).expand(len(names), -1, -1, -1),
                                          backbone.prompt_encoder.get_dense_pe(), sparse, dense,
                                          multimask_output=False)
        logits = F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=False)
        logits = F.interpolate(logits[..., :resized[0], :resized[1]], (rows, columns), mode="bilinear",
                               align_corners=False)
        for name, mask in zip(names, logits[:, 0] > 0):
            masks[name][..., z] = mask.numpy()
    return masks


def dice(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two boolean volumes (1 when both are empty)."""
    total = predicted.sum() + truth.sum()
    return 1.0 if total == 0 else float(2 * (predicted & truth).sum() / total)
