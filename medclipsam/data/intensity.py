"""Intensity normalisation as MONAI transforms: CT windows by name (HU clipped) and MRI percentile scaling to [0, 1]."""
from __future__ import annotations

import numpy as np
from monai.config import DtypeLike, KeysCollection
from monai.transforms import (
    ScaleIntensityRange,
    ScaleIntensityRanged,
    ScaleIntensityRangePercentiles,
    ScaleIntensityRangePercentilesd,
    Transform,
)

CT_WINDOWS: dict[str, tuple[float, float]] = {
    "abdomen": (400.0, 40.0),
    "liver": (150.0, 30.0),
    "lung": (1500.0, -600.0),
    "bone": (1800.0, 400.0),
    "brain": (80.0, 40.0),
    "soft_tissue": (350.0, 50.0),
    "mediastinum": (350.0, 50.0),
}
"""CT window presets by name: (width, level) in Hounsfield units."""


def window_bounds(
    preset: str | None = "abdomen", width: float | None = None, level: float | None = None
) -> tuple[float, float]:
    """HU range [level - width/2, level + width/2] of a named preset, with `width`/`level` overriding it."""
    if preset is None:
        if width is None or level is None:
            raise ValueError("CT window: give a preset name or both width and level (in HU)")
        preset_width, preset_level = width, level
    else:
        key = preset.strip().lower().replace(" ", "_").replace("-", "_")
        if key not in CT_WINDOWS:
            raise ValueError(f"unknown CT window preset {preset!r}; known presets: {', '.join(CT_WINDOWS)}")
        preset_width, preset_level = CT_WINDOWS[key]
    width = preset_width if width is None else width
    level = preset_level if level is None else level
    if width <= 0:
        raise ValueError(f"CT window width must be positive, got {width}")
    return level - width / 2.0, level + width / 2.0


class CTWindow(ScaleIntensityRange):
    """Clip CT intensities (HU) to a window and scale them to [0, 1]; the window is a preset or width/level."""

    def __init__(
        self,
        preset: str | None = "abdomen",
        width: float | None = None,
        level: float | None = None,
        dtype: DtypeLike = np.float32,
    ) -> None:
        low, high = window_bounds(preset, width, level)
        super().__init__(a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True, dtype=dtype)


class CTWindowd(ScaleIntensityRanged):
    """Dictionary form of `CTWindow`."""

    def __init__(
        self,
        keys: KeysCollection,
        preset: str | None = "abdomen",
        width: float | None = None,
        level: float | None = None,
        dtype: DtypeLike = np.float32,
        allow_missing_keys: bool = False,
    ) -> None:
        low, high = window_bounds(preset, width, level)
        super().__init__(
            keys, a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True, dtype=dtype,
            allow_missing_keys=allow_missing_keys,
        )


class MRIPercentileNormalize(ScaleIntensityRangePercentiles):
    """Clip MRI intensities to the [lower, upper] percentiles of the volume and scale them to [0, 1]."""

    def __init__(self, lower: float = 0.5, upper: float = 99.5, dtype: DtypeLike = np.float32) -> None:
        super().__init__(lower=lower, upper=upper, b_min=0.0, b_max=1.0, clip=True, dtype=dtype)


class MRIPercentileNormalized(ScaleIntensityRangePercentilesd):
    """Dictionary form of `MRIPercentileNormalize`."""

    def __init__(
        self,
        keys: KeysCollection,
        lower: float = 0.5,
        upper: float = 99.5,
        dtype: DtypeLike = np.float32,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(
            keys, lower=lower, upper=upper, b_min=0.0, b_max=1.0, clip=True, dtype=dtype,
            allow_missing_keys=allow_missing_keys,
        )


def intensity_transform(modality: str, window: str | None = "abdomen") -> Transform:
    """The normalisation for a modality: a CT window ("CT") or percentile scaling ("MR"/"MRI")."""
    key = modality.strip().upper()
    if key == "CT":
        return CTWindow(window)
    if key in ("MR", "MRI"):
        return MRIPercentileNormalize()
    raise ValueError(f"unknown modality {modality!r}; expected 'CT', 'MR' or 'MRI'")
