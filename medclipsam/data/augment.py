"""Few-label augmentation of training slices, the same for every method: each labelled slice becomes several views
(MONAI `Rand*d` transforms: rotation, scale, shift, window and contrast jitter, noise, blur). No left-right flip:
laterality is part of the concept ("left kidney")."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

from monai.transforms import (
    Compose, RandAffined, RandGaussianNoised, RandGaussianSmoothd, RandScaleIntensityd, RandShiftIntensityd,
)
from monai.utils import convert_to_tensor


@dataclass(frozen=True)
class AugmentSettings:
    """How many views per labelled slice (the original included) and how far each random change goes."""

    views: int = 1  # 1: no augmentation
    rotate_deg: float = 15.0
    scale: float = 0.15  # zoom in [1 - scale, 1 + scale]
    shift: float = 0.08  # translation up to this share of the slice side
    contrast: float = 0.15  # intensities x (1 + u), u in [-contrast, contrast] (window width)
    brightness: float = 0.05  # + u, u in [-brightness, brightness] (window level)
    noise_sd: float = 0.02
    blur_probability: float = 0.3  # Gaussian blur, sigma 0.25-1 pixel

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


def augmentation(settings: AugmentSettings, size: int) -> Compose:
    """The MONAI pipeline for one view of an item's "image" (1, S, S) and "masks" (K, S, S)."""
    return Compose([
        RandAffined(keys=["image", "masks"], prob=1.0, rotate_range=math.radians(settings.rotate_deg),
                    scale_range=(settings.scale, settings.scale), translate_range=(settings.shift * size,) * 2,
                    mode=("bilinear", "nearest"), padding_mode="zeros"),
        RandScaleIntensityd(keys="image", factors=settings.contrast, prob=1.0),
        RandShiftIntensityd(keys="image", offsets=settings.brightness, prob=1.0),
        RandGaussianNoised(keys="image", std=settings.noise_sd, prob=1.0),
        RandGaussianSmoothd(keys="image", sigma_x=(0.25, 1.0), sigma_y=(0.25, 1.0),
                            prob=settings.blur_probability),
    ])


def augment_items(items: Sequence[dict], settings: AugmentSettings, seed: int = 0) -> list[dict]:
    """Each item followed by `settings.views - 1` augmented copies (seeded: the same views every run); a concept
    whose mask leaves the slice becomes absent in that view."""
    if settings.views < 1:
        raise ValueError(f"views must be at least 1 (the original), got {settings.views}")
    if settings.views == 1 or not items:
        return list(items)
    pipeline = augmentation(settings, int(items[0]["image"].shape[-1]))
    pipeline.set_random_state(seed=seed)
    out = []
    for item in items:
        out.append(item)
        for _ in range(settings.views - 1):
            view = pipeline({"image": item["image"][:1].clone(), "masks": item["masks"].clone()})
            image = convert_to_tensor(view["image"], track_meta=False).float().clamp(0.0, 1.0)
            masks = (convert_to_tensor(view["masks"], track_meta=False).float() > 0.5).float()
            out.append({**item, "image": image.expand(3, -1, -1), "masks": masks,
                        "present": [bool(m.any()) for m in masks], "augmented": True})
    return out
