"""What a scanner sees around the abdomen: the patient table (curved cradle or flat top, carbon shell around a
foam core), an optional foam pad, and the arms when they are down at the patient's sides. None of it is labelled.

Heights follow the patient: the table is raised until it (or its pad) meets the lowest point of the body, then
lowered by the geometry's air gap; arms rest on it beside the body. All of it is placed from probes of the body's
shape, not from the image grid, so it sits in the same place whatever the field of view.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .anatomy import BodyRegions, Surroundings
from .canvas import Blob, Canvas
from .geometry import ScannerGeometry
from .layout import Layout

POSITION_STREAM = 3  # SeedSequence stream of a seed's table and arm details
_PROBE_MM = 1.0  # grid step used to find the body's extent independently of the image's field of view


@dataclass(frozen=True)
class _Arm:
    """One arm hanging at the side: an elliptic cross-section (skin) with fat, muscle and bones that change at
    the elbow (humerus above, epicondyles at, radius and ulna below)."""

    centre: np.ndarray  # (x, y) mm
    radii: np.ndarray  # upper-arm semi-axes (x, y) mm
    fat_mm: float
    elbow_z: float
    forearm: float  # forearm size relative to the upper arm
    humerus_mm: float
    pronation: float  # radians: angle of the radius-ulna pair
    hu: dict[str, float]

    def layers(self, z: float) -> list[tuple[np.ndarray, np.ndarray, str]]:
        """Ellipses (centre, semi-axes, tissue) to paint in order in a slice at height `z`."""
        size = self.radii if z >= self.elbow_z - 10.0 else self.radii * self.forearm
        shells = [(self.centre, size, "fat"), (self.centre, np.maximum(size - self.fat_mm, 0.5 * size), "muscle")]
        if z > self.elbow_z + 12.0:
            bones = [(self.centre, np.full(2, self.humerus_mm), "marrow")]
        elif z >= self.elbow_z - 12.0:
            bones = [(self.centre, np.array([2.4, 1.0]) * self.humerus_mm, "cancellous")]  # epicondyles
        else:
            step = 11.0 * np.array([np.cos(self.pronation), np.sin(self.pronation)])
            bones = [(self.centre + step, np.full(2, 7.0), "marrow"), (self.centre - step, np.full(2, 6.5), "marrow")]
        for centre, radii, inner in bones:
            shells += [(centre, radii, "cortex"), (centre, radii - 3.0, inner)]
        return shells


def scanner_surroundings(seed: int, geometry: ScannerGeometry) -> Surroundings:
    """Drawer of the table, pad and arms of `geometry` for case `seed` (the same in every slab of a volume)."""

    placed: list[tuple[_Table, list[_Arm]]] = []  # every slab has the same body: place table and arms once

    def draw(canvas: Canvas, layout: Layout, body: BodyRegions) -> None:
        if not placed:  # the table is placed even when not drawn: the arms rest where it would be
            rng = np.random.default_rng((int(seed), POSITION_STREAM))
            table = _Table.drawn(rng, geometry, body.outline)
            placed.append((table, _arms(rng, body.outline, layout, table) if geometry.arms == "down" else []))
        table, arms = placed[0]
        if geometry.table != "none":
            table.paint(canvas, body.outline, arms)
        for arm in arms:
            _draw_arm(canvas, arm)

    return draw


@dataclass(frozen=True)
class _Table:
    """A table top centred under the isocentre: carbon shell around a foam core, its top surface at `top` + the
    curve's rise, and an optional foam pad (with a thin cover) on it."""

    half_width: float
    thickness: float
    rise: float  # how far a curved cradle's edges rise at x = +-200 mm
    top: float  # world y of the top surface at x = 0
    pad_mm: float
    sink: float  # how far the patient presses into the pad
    hu: dict[str, float]

    @classmethod
    def drawn(cls, rng: np.random.Generator, geometry: ScannerGeometry, outline: Blob) -> _Table:
        """Random table details, raised to the body's lowest clearance less the gap and the pad."""
        curved = geometry.table == "curved"
        half_width = rng.uniform(205.0, 235.0) if curved else rng.uniform(215.0, 250.0)
        thickness = rng.uniform(12.0, 25.0) if curved else rng.uniform(30.0, 55.0)
        cradle_rise = rng.uniform(20.0, 45.0)  # drawn for flat tables too, so the draws after it do not depend on it
        rise = cradle_rise if curved else 0.0
        hu = {"shell": rng.uniform(200.0, 400.0), "core": rng.uniform(-950.0, -800.0),
              "pad": rng.uniform(-920.0, -780.0), "cover": rng.uniform(-150.0, 50.0)}
        sink = min(0.3 * geometry.pad_mm, 10.0) if geometry.gap_mm == 0 else 0.0
        table = cls(half_width, thickness, rise, 0.0, geometry.pad_mm, sink, hu)
        xs = np.arange(-half_width, half_width, _PROBE_MM)
        lowest = _body_rows(outline, xs, np.arange(-400.0, 300.0, _PROBE_MM))[0]
        clearance = float((lowest - table.profile(xs))[np.isfinite(lowest)].min())
        return replace(table, top=clearance - geometry.gap_mm - geometry.pad_mm + sink)

    def profile(self, x: np.ndarray) -> np.ndarray:
        """Rise (mm) of the top surface above its centre at world x."""
        return self.rise * (x / 200.0) ** 2

    def surface(self, x: float) -> float:
        """World y where something lying on the table (or its pad) at world x rests."""
        edge = float(np.clip(x, -self.half_width, self.half_width))
        return self.top + float(self.profile(np.array(edge))) + self.pad_mm - self.sink

    def paint(self, canvas: Canvas, outline: Blob, arms: list[_Arm]) -> None:
        """Paint table and pad in the first plane, around the body and arms, and copy them into every plane."""
        plane = canvas.plane()
        x, y, _ = canvas.coords(plane)
        height = y - self.top - self.profile(x)  # height above the top surface
        middle, half = -self.thickness / 2.0, self.thickness / 2.0
        canvas.paint(plane, (x / self.half_width) ** 8 + ((height - middle) / half) ** 8 < 1.0, self.hu["shell"])
        core = (x / (self.half_width - 3.0)) ** 8 + ((height - middle) / (half - 2.0)) ** 8 < 1.0
        canvas.paint(plane, core, self.hu["core"])
        if self.pad_mm > 0:
            occupied = outline.inside(canvas, plane)
            for arm in arms:
                occupied = occupied | _ellipse(x, y, arm.centre, arm.radii)
            on_table = (np.abs(x) < self.half_width - 10.0) & (height >= 0.0) & ~occupied
            canvas.paint(plane, on_table & (height < self.pad_mm), self.hu["pad"])
            canvas.paint(plane, on_table & (height >= self.pad_mm - 1.5) & (height < self.pad_mm), self.hu["cover"])
        canvas.extrude_first_plane()


def _body_rows(outline: Blob, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """On a probe grid (not the image's): the body's lowest y per column of `xs` (inf where none), and its
    leftmost and rightmost x per row of `ys` (nan where none)."""
    probe = Canvas([xs, ys, np.array([0.0])])
    inside = outline.inside(probe, probe.whole())[:, :, 0]
    lowest = np.where(inside, ys[None, :], np.inf).min(axis=1)
    left = np.where(inside, xs[:, None], np.inf).min(axis=0)
    right = np.where(inside, xs[:, None], -np.inf).max(axis=0)
    absent = ~inside.any(axis=0)
    left[absent], right[absent] = np.nan, np.nan
    return lowest, left, right


def _arm_x(outline: Blob, y: float, radii: np.ndarray, gap: float, side: float) -> float:
    """Centre x of an arm (semi-axes `radii`, centre height `y`) placed `gap` mm beside the body at every height
    its cross-section spans."""
    t = np.linspace(-0.98, 0.98, 41)
    ys = y + t * radii[1]
    half = radii[0] * np.sqrt(1.0 - t ** 2)
    _, left, right = _body_rows(outline, np.arange(-450.0, 450.0, _PROBE_MM / 2), ys)
    if side > 0:
        return float(np.nanmax(np.append(right + gap + half, outline.centre[0])))
    return float(np.nanmin(np.append(left - gap - half, outline.centre[0])))


def _arms(rng: np.random.Generator, outline: Blob, layout: Layout, table: _Table) -> list[_Arm]:
    """Both arms resting on the table (or pad) beside the body, their size growing with the body's fat."""
    arms = []
    for side in (1.0, -1.0):
        rx = rng.uniform(38.0, 46.0) + 0.3 * layout.extra_fat_mm
        radii = np.array([rx, rx * rng.uniform(1.0, 1.15)])
        gap, lift = rng.uniform(0.0, 12.0), rng.uniform(0.0, 8.0)
        y = float(outline.centre[1])
        for _ in range(2):  # settle: the table's height depends on where the arm lies across it
            x = _arm_x(outline, y, radii, gap, side)
            y = table.surface(x) + radii[1] + lift
        hu = {"fat": rng.uniform(-110.0, -90.0), "muscle": rng.uniform(45.0, 60.0),
              "cortex": rng.uniform(1000.0, 1400.0), "marrow": rng.uniform(-40.0, 60.0),
              "cancellous": rng.uniform(250.0, 400.0)}
        arms.append(_Arm(np.array([_arm_x(outline, y, radii, gap, side), y]), radii,
                         rng.uniform(4.0, 10.0) + 0.4 * layout.extra_fat_mm, rng.uniform(-20.0, 40.0),
                         rng.uniform(0.7, 0.8), rng.uniform(10.0, 13.0), rng.uniform(-0.5, 0.5), hu))
    return arms


def _ellipse(x: np.ndarray, y: np.ndarray, centre: np.ndarray, radii: np.ndarray) -> np.ndarray:
    return ((x - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2 < 1.0


def _draw_arm(canvas: Canvas, arm: _Arm) -> None:
    """Paint an arm slice by slice (its bones change along z)."""
    around = canvas.box(np.array([*arm.centre, canvas.axes[2][0]]), np.array([*(arm.radii + 1.0), np.inf]))
    if around is None:
        return
    for k, z in enumerate(canvas.axes[2]):
        box = (around[0], around[1], slice(k, k + 1))
        x, y, _ = canvas.coords(box)
        for centre, radii, tissue in arm.layers(float(z)):
            canvas.paint(box, _ellipse(x, y, centre, radii), arm.hu[tissue])
