"""Test helpers shared by the method and experiment tests: small CT phantoms written as NIfTI and loaded as cases,
and their slices in a model's frame."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from medclipsam.data.concepts import ConceptCard
from medclipsam.data.frame import FrameSettings
from medclipsam.data.phantom import DEFAULT_SPACING, make_phantom
from medclipsam.data.slices import frame_case, load_case, slice_items, unlabelled_items

# a frame that holds the small test phantoms whole: 64 x 64 voxels of 3 mm are 192 mm across (anatomy scaled down)
SMALL_PHANTOM_FOV_MM = 200.0


def phantom_case(folder: Path, seed: int, shape: Sequence[int] = (64, 64, 16),
                 spacing: Sequence[float] = DEFAULT_SPACING, organs: int | None = None) -> dict:
    """Phantom `seed` written into `folder` as NIfTI and loaded as a case (RAS, HU); with `organs`, label ids above
    it become background."""
    phantom = make_phantom(seed, shape=tuple(shape), spacing=tuple(spacing))
    if organs is not None:
        phantom.label[phantom.label > organs] = 0
    image, label = folder / f"ct_{seed}.nii.gz", folder / f"label_{seed}.nii.gz"
    phantom.to_nifti(image, label)
    return load_case({"image": str(image), "label": str(label)})


def framed_items(case: dict, card: ConceptCard, frame: FrameSettings, **options: Any) -> list[dict]:
    """Labelled slice items of a loaded case in `frame` (`slice_items` options passed on)."""
    return slice_items(frame_case(case, frame), card, **options)


def framed_images(case: dict, frame: FrameSettings) -> list[dict]:
    """Every slice of a loaded case in `frame` as an unlabelled item."""
    return unlabelled_items(frame_case(case, frame))
