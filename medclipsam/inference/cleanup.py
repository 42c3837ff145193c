"""3D clean-up of predicted organ masks: per-slice predictions leave specks on distant slices and small holes.

Three steps, each optional: drop slices whose mask has no neighbour slice with mask (isolated false hits), keep the
largest 3D connected component (MONAI `KeepLargestConnectedComponent`, for anatomy that is one piece), fill holes
slice by slice (MONAI `FillHoles` on each slice).
"""
from __future__ import annotations

from typing import Collection, Mapping

import numpy as np
from monai.transforms import FillHoles, KeepLargestConnectedComponent
from monai.transforms.utils import generate_spatial_bounding_box

# Words naming anatomy or findings that are usually several pieces: keep every component for these.
MULTI_PART_WORDS = (
    "vessel", "tumour", "tumor", "lesion", "nodule", "metasta", "cyst", "bowel", "intestine", "colon", "rib",
    "vertebra", "bone", "lymph", "kidneys", "lungs", "adrenal glands", "cancer", "edema", "oedema", "necrosis",
)
_LARGEST = KeepLargestConnectedComponent(connectivity=3)
_FILL = FillHoles()


def is_single_piece(concept: str) -> bool:
    """True when the name is anatomy that is one connected piece (so only its largest component is kept)."""
    name = concept.lower()
    return not any(word in name for word in MULTI_PART_WORDS)


def _drop_isolated_slices(mask: np.ndarray, axis: int) -> np.ndarray:
    present = mask.any(axis=tuple(a for a in range(3) if a != axis))
    neighbour = np.zeros_like(present)
    neighbour[1:] |= present[:-1]
    neighbour[:-1] |= present[1:]
    keep = present & neighbour if present.sum() > 1 else present
    shape = [1, 1, 1]
    shape[axis] = -1
    return mask & keep.reshape(shape)


def _fill_holes_per_slice(mask: np.ndarray, axis: int) -> np.ndarray:
    moved = np.moveaxis(mask, axis, 0)
    filled = np.stack([np.asarray(_FILL(plane[None].astype(np.uint8)))[0] > 0 if plane.any() else plane
                       for plane in moved])
    return np.moveaxis(filled, 0, axis)


def clean_mask(mask: np.ndarray, single_component: bool = True, fill_holes: bool = True,
               drop_isolated_slices: bool = True, axis: int = 2) -> np.ndarray:
    """A cleaned copy of a 3D boolean mask (slices stacked along `axis`); the input is not changed."""
    cleaned = np.asarray(mask, dtype=bool)
    if cleaned.ndim != 3:
        raise ValueError(f"clean_mask needs a 3D mask, got shape {cleaned.shape}")
    if not cleaned.any():
        return cleaned.copy()
    if drop_isolated_slices:
        cleaned = _drop_isolated_slices(cleaned, axis)
    if single_component and cleaned.any():
        cleaned = np.asarray(_LARGEST(cleaned[None].astype(np.uint8)))[0] > 0
    if fill_holes:
        cleaned = _fill_holes_per_slice(cleaned, axis)
    return cleaned.copy()


def clean_label_map(labels: np.ndarray, names: Mapping[int, str], fill_only: Collection[int] = (),
                    axis: int = 2) -> np.ndarray:
    """Label map with each concept (value -> name) cleaned by `clean_mask` (values in `fill_only`, e.g. concepts
    prompted by clicks on a few slices, only get their holes filled); filled holes only take voxels that no concept
    claimed, so clean-up never moves a voxel from one concept to another. Each concept is cleaned inside its bounding
    box (one voxel of margin): the same result as on the whole grid, at a fraction of its time and memory."""
    labels = np.asarray(labels)
    out = np.zeros_like(labels)
    for value, name in names.items():
        found = labels == value
        if not found.any():
            continue
        start, end = generate_spatial_bounding_box(found[None], margin=1, allow_smaller=True)  # clipped to the grid
        box = tuple(slice(low, high) for low, high in zip(start, end))
        inside, whole = found[box], value not in fill_only
        mask = clean_mask(inside, single_component=whole and is_single_piece(name), drop_isolated_slices=whole,
                          axis=axis)
        out[box][mask & (inside | (labels[box] == 0))] = value
    return out
