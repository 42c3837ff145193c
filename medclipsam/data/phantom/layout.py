"""Per-case anatomy variation: where the anatomy sits (scale, turn, shift), body habitus, and contrast enhancement.

Anatomical positions are mm in a patient frame (x to the patient's right, y anterior, z superior; z = 0 about the
renal hila) for a body of 150 x 110 mm semi-axes; a layout maps them to world mm.
"""
from __future__ import annotations

import functools
import json
from importlib.resources import files

import numpy as np
from scipy.spatial.transform import Rotation

from .canvas import LONG, Blob

DESIGN_FOV_MM = (360.0, 300.0, 192.0)  # extent the classic anatomy is laid out in; smaller grids get it scaled down
PHASES = ("non-contrast", "arterial", "portal venous")
_PHYSICAL_Z_RANGE = (-250.0, 250.0)  # where vessels run in a scanner phantom: fixed, so no scan range changes them


def classic_enhancement(p: float) -> dict[str, float]:
    """Mean HU of enhancing tissues between late arterial (p = 0) and portal venous (p = 1): the classic phantom."""
    return {"liver": 55 + 30 * p, "spleen": 60 + 45 * p, "pancreas": 75 - 25 * p, "kidney cortex": 160 + 15 * p,
            "kidney medulla": 95 + 60 * p, "hepatic veins": 65 + 100 * p, "portal veins": 110 + 70 * p,
            "aorta": 250 - 50 * p, "ivc": 50 + 100 * p, "bowel wall": 45 + 25 * p, "colon wall": 40 + 20 * p,
            "stomach wall": 60 + 20 * p}


@functools.cache
def _phase_hu() -> dict[str, list[float]]:
    """Mean HU per tissue and phase (in the order of PHASES), from the package's table."""
    table = json.loads((files("medclipsam") / "assets" / "phantom_phase_hu.json").read_text(encoding="utf-8"))
    if tuple(table["phases"]) != PHASES:
        raise ValueError(f"phantom_phase_hu.json lists phases {table['phases']}, expected {PHASES}")
    return table["hu"]


def phase_enhancement(phase: str, bolus: float) -> dict[str, float]:
    """Mean HU of enhancing tissues in a scanner `phase`; `bolus` scales the enhancement above non-contrast."""
    column = PHASES.index(phase)
    return {tissue: values[0] + bolus * (values[column] - values[0]) for tissue, values in _phase_hu().items()}


class Layout:
    """Maps anatomical positions to world mm for one case and draws its random variations from `rng`."""

    def __init__(self, rng: np.random.Generator, body_axes: np.ndarray, scale: np.ndarray, turn: np.ndarray,
                 shift: np.ndarray, enhancement: dict[str, float], z_range: tuple[float, float],
                 extra_fat_mm: float = 0.0) -> None:
        self.rng = rng
        self.body_axes = body_axes
        self.scale = scale
        self.in_plane = self.scale * np.array([1.0, 1.0, 1.0 / self.scale[2]])  # for vertical tube radii
        self.turn = turn
        self.shift = shift
        self.enhancement = enhancement
        self.z_bottom, self.z_top = z_range
        self.extra_fat_mm = extra_fat_mm

    @classmethod
    def classic(cls, rng: np.random.Generator, fov: np.ndarray, z_range: tuple[float, float]) -> Layout:
        """The classic phantom's layout: anatomy scaled down to fit a field of view `fov` smaller than the design."""
        fit = np.minimum(1.0, fov / np.asarray(DESIGN_FOV_MM))
        body_axes = np.array([rng.uniform(138, 165), rng.uniform(100, 120)])
        scale = fit * np.array([body_axes[0] / 150.0, body_axes[1] / 110.0, 1.0])
        turn = Rotation.from_euler("z", rng.uniform(-4.0, 4.0), degrees=True).as_matrix()
        shift = np.array([rng.uniform(-10, 10), rng.uniform(-8, 8), 0.0]) * fit
        return cls(rng, body_axes, scale, turn, shift, classic_enhancement(rng.uniform(0.0, 1.0)), z_range)

    @classmethod
    def physical(cls, rng: np.random.Generator, offset_mm: tuple[float, float],
                 enhancement: dict[str, float]) -> Layout:
        """A scanner phantom's layout: anatomy at its physical size, body centred `offset_mm` from the isocentre.

        Only `rng` (the case's anatomy stream) varies the anatomy, so one seed gives the same patient at any geometry.
        """
        frame = rng.uniform(0.92, 1.08)
        scale = np.array([frame * rng.uniform(0.96, 1.04), frame * rng.uniform(0.96, 1.04), rng.uniform(0.93, 1.07)])
        extra_fat = 45.0 * rng.beta(1.3, 2.6)  # slim to obese: subcutaneous fat beyond the classic range
        turn = Rotation.from_euler("z", rng.uniform(-5.0, 5.0), degrees=True).as_matrix()
        shift = np.array([offset_mm[0], offset_mm[1], 0.0])
        return cls(rng, np.array([150.0, 110.0]) * scale[:2], scale, turn, shift, enhancement, _PHYSICAL_Z_RANGE,
                   extra_fat)

    def point(self, xyz: tuple[float, float, float], jitter_mm: float = 0.0) -> np.ndarray:
        """World position of an anatomical position (mm, before body scaling), with optional jitter."""
        local = np.asarray(xyz, float) + np.clip(self.rng.normal(0.0, jitter_mm, 3), -2 * jitter_mm, 2 * jitter_mm)
        return self.turn @ (local * self.scale) + self.shift

    def hu(self, mean: float, sd: float) -> float:
        """A tissue's HU for this case."""
        return float(mean + self.rng.normal(0.0, sd))

    def enhanced(self, tissue: str, sd: float) -> float:
        """HU of an enhancing tissue for this case (its phase mean plus case variation)."""
        return self.hu(self.enhancement[tissue], sd)

    def blob(self, centre: tuple[float, float, float], axes: tuple[float, float, float],
             angles_deg: tuple[float, float, float] = (0.0, 0.0, 0.0), jitter_mm: float = 8.0,
             size_var: float = 0.15, wobble: float = 0.07, waves: int = 3) -> Blob:
        """A randomly varied organ-like blob around an anatomical position, size and orientation (xyz Euler)."""
        rng = self.rng
        size = np.asarray(axes, float) * rng.uniform(1 - size_var, 1 + size_var) * rng.uniform(0.95, 1.05, 3)
        extruded = axes[2] >= LONG
        tilt = rng.normal(0.0, 4.0, 3)
        if extruded:
            tilt[:2] = 0.0  # a prism along z may only turn in-plane
        angles = np.asarray(angles_deg, float) + tilt
        rotation = self.turn @ Rotation.from_euler("xyz", angles, degrees=True).as_matrix()
        direction = rng.normal(size=(waves, 3))
        if extruded:
            direction[:, 2] = 0.0
        direction /= np.linalg.norm(direction, axis=1, keepdims=True)
        freq = direction * rng.uniform(1.5, 3.0, (waves, 1))
        amp = np.clip(rng.normal(0.0, wobble, (waves, 3)), -1.5 * wobble, 1.5 * wobble)
        size = size * self.scale
        if extruded:
            size[2] = LONG
        return Blob(self.point(centre, jitter_mm), size, rotation, amp, freq, rng.uniform(0, 2 * np.pi, waves))

    def curve(self, knots: list[tuple[float, float, float]], step_mm: float, jitter_mm: float) -> np.ndarray:
        """Points every ~`step_mm` along a piecewise-linear path through jittered anatomical knots (world mm)."""
        world = np.stack([self.point(k, jitter_mm) for k in knots])
        pieces = []
        for a, b in zip(world[:-1], world[1:]):
            count = max(2, int(np.ceil(np.linalg.norm(b - a) / step_mm)) + 1)
            pieces.append(a + np.linspace(0.0, 1.0, count)[:, None] * (b - a))
        return np.concatenate(pieces)
