"""Scanner geometry of a phantom: matrix, pixel size, slices, table, arms, patient position, contrast phase and
noise, and a seeded draw of realistic abdominal CT protocols (so models meet the variety real scanners produce)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from medclipsam.errors import InputError

from .classic import checked_seed
from .layout import PHASES

TABLES = ("curved", "flat", "none")
ARMS = ("up", "down")
SCAN_FOV_MM = 500.0  # diameter of the scanned circle around the isocentre; outside it a reconstruction is padding
GEOMETRY_STREAM = 1  # SeedSequence stream of a seed's geometry (the anatomy, position and noise use others)
_SLICE_MM = (0.625, 1.0, 1.25, 2.0, 2.5, 3.0, 5.0)  # common abdominal reconstructions
_SLICE_P = (0.08, 0.10, 0.10, 0.07, 0.20, 0.20, 0.25)


@dataclass(frozen=True)
class ScannerGeometry:
    """How one CT was acquired and reconstructed. World frame: RAS mm, x/y = 0 at the scanner's isocentre (the
    centre of the display field of view), z = 0 about the patient's renal hila."""

    matrix: int = 512  # pixels per row and column
    pixel_mm: float = 0.78  # in-plane pixel size; the display field of view is matrix * pixel_mm
    slice_mm: float = 3.0  # slice thickness and spacing
    slices: int = 70
    z_centre_mm: float = 0.0  # anatomical height of the scanned range's centre
    table: str = "curved"  # "curved" cradle, "flat" top, or "none"
    pad_mm: float = 0.0  # foam pad on the table, touching the patient's back (0: none)
    gap_mm: float = 5.0  # air between the patient's back and the table or pad (0: touching)
    arms: str = "up"  # "up" (out of the abdomen's slices) or "down" (at the sides)
    offset_mm: tuple[float, float] = (0.0, 0.0)  # patient's centre from the isocentre (x right, y anterior)
    phase: str = "portal venous"  # "non-contrast", "arterial" or "portal venous"
    noise_hu: float = 12.0  # standard deviation of the image noise (HU)

    def __post_init__(self) -> None:
        _check_int("matrix", self.matrix, 16, 2048, "512")
        _check_int("slices", self.slices, 1, 2000, "70")
        for name, low in (("pixel_mm", 0.1), ("slice_mm", 0.1)):
            _check_number(name, getattr(self, name), low, 20.0)
        _check_number("z_centre_mm", self.z_centre_mm, -400.0, 400.0)
        _check_number("pad_mm", self.pad_mm, 0.0, 150.0)
        _check_number("gap_mm", self.gap_mm, 0.0, 150.0)
        _check_number("noise_hu", self.noise_hu, 0.0, 500.0, "HU")
        for name, value, allowed in (("table", self.table, TABLES), ("arms", self.arms, ARMS),
                                     ("phase", self.phase, PHASES)):
            if value not in allowed:
                raise InputError(None, f"scanner geometry {name} {value!r} is not one of {allowed}",
                                 f"Pass {name}= one of {', '.join(map(repr, allowed))}")
        offset = tuple(self.offset_mm) if isinstance(self.offset_mm, (tuple, list, np.ndarray)) else ()
        if len(offset) != 2:
            raise InputError(None, f"scanner geometry offset_mm {self.offset_mm!r} is not (x, y) in mm",
                             "Pass offset_mm=(x, y), e.g. (10.0, -25.0)")
        for value in offset:
            _check_number("offset_mm", value, -200.0, 200.0)
        object.__setattr__(self, "offset_mm", tuple(float(v) for v in offset))

    @property
    def fov_mm(self) -> float:
        """Display field of view (mm): the width the matrix covers."""
        return self.matrix * self.pixel_mm

    @property
    def shape(self) -> tuple[int, int, int]:
        """Volume shape (X, Y, Z)."""
        return self.matrix, self.matrix, self.slices

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size (mm) along X, Y, Z."""
        return float(self.pixel_mm), float(self.pixel_mm), float(self.slice_mm)

    def affine(self) -> np.ndarray:
        """RAS affine: pixel spacing on the diagonal, the isocentre in the middle of each slice, slices centred on
        `z_centre_mm`."""
        affine = np.diag([*self.spacing, 1.0])
        affine[:3, 3] = [-(self.matrix - 1) / 2.0 * self.pixel_mm, -(self.matrix - 1) / 2.0 * self.pixel_mm,
                         self.z_centre_mm - (self.slices - 1) / 2.0 * self.slice_mm]
        return affine

    def to_dict(self) -> dict:
        """Plain JSON-ready values of every setting."""
        return {"matrix": self.matrix, "pixel_mm": self.pixel_mm, "fov_mm": self.fov_mm, "slice_mm": self.slice_mm,
                "slices": self.slices, "z_centre_mm": self.z_centre_mm, "table": self.table, "pad_mm": self.pad_mm,
                "gap_mm": self.gap_mm, "arms": self.arms, "offset_mm": list(self.offset_mm), "phase": self.phase,
                "noise_hu": self.noise_hu}


def scanner_geometry(seed: int) -> ScannerGeometry:
    """A realistic abdominal CT geometry drawn from `seed`: 512 matrix over a 310-500 mm field of view, 0.625-5 mm
    slices over 180-250 mm, curved or flat table (pad or air gap), arms mostly up, patient off-centre, a contrast
    phase, and noise growing as slices thin."""
    checked_seed(seed)
    rng = np.random.default_rng((int(seed), GEOMETRY_STREAM))
    fov = float(round(rng.uniform(310.0, 500.0)))
    slice_mm = float(rng.choice(_SLICE_MM, p=_SLICE_P))
    extent = rng.uniform(180.0, 250.0)
    pad = float(rng.uniform(15.0, 50.0)) if rng.uniform() < 0.5 else 0.0
    gap = 0.0 if pad else float(rng.uniform(0.0, 12.0))
    arms = "down" if rng.uniform() < 0.3 else "up"
    offset = (float(np.clip(rng.normal(0.0, 15.0), -45.0, 45.0)), float(np.clip(rng.normal(-15.0, 18.0), -60.0, 30.0)))
    dose_noise = rng.uniform(8.0, 14.0)  # HU at 5 mm slices: quantum noise grows as 1 / sqrt(slice thickness)
    noise = dose_noise * math.sqrt(5.0 / slice_mm) * (1.15 if arms == "down" else 1.0)
    return ScannerGeometry(matrix=512, pixel_mm=fov / 512, slice_mm=slice_mm, slices=max(1, round(extent / slice_mm)),
                           z_centre_mm=float(rng.uniform(-5.0, 15.0)), table=("curved", "flat")[rng.integers(2)],
                           pad_mm=pad, gap_mm=gap, arms=arms, offset_mm=offset,
                           phase=PHASES[rng.choice(3, p=(0.25, 0.25, 0.5))], noise_hu=float(noise))


def _check_int(name: str, value: object, low: int, high: int, example: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value <= high:
        raise InputError(None, f"scanner geometry {name} {value!r} is not a whole number in {low}..{high}",
                         f"Pass {name}={example}")


def _check_number(name: str, value: object, low: float, high: float, unit: str = "mm") -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not np.isfinite(value) or not low <= value <= high:
        raise InputError(None, f"scanner geometry {name} {value!r} is not a number in {low:g}..{high:g} {unit}",
                         f"Pass {name} in that range")
