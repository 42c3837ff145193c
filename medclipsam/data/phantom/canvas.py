"""Drawing surface for phantoms: HU and label samples at known world positions, and the smooth random shapes
(deformed ellipsoids, tubes) painted on it. Later paint replaces earlier paint, so image and label always agree."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

HU_RANGE = (-1024.0, 3071.0)
LONG = 1.0e5  # semi-axis used for structures that run through the whole volume (body, spine)

Box = tuple[slice, slice, slice]
Within = Callable[[Box], np.ndarray]


class Canvas:
    """HU and label arrays over a grid of world sample positions given per axis (mm, RAS)."""

    def __init__(self, axes: Sequence[np.ndarray]) -> None:
        self.axes = [np.asarray(a, float) for a in axes]
        size = tuple(len(a) for a in self.axes)
        self.hu = np.full(size, -1000.0, np.float32)
        self.label = np.zeros(size, np.uint8)

    @classmethod
    def supersampled(cls, shape: tuple[int, int, int], spacing: tuple[float, float, float], origin: np.ndarray,
                     factors: tuple[int, int, int]) -> Canvas:
        """Canvas sampling each voxel of a grid (first voxel centre at `origin`) `factors[d]` times along axis d."""
        return cls([origin[d] + ((np.arange(shape[d] * f) + 0.5) / f - 0.5) * spacing[d]
                    for d, f in enumerate(factors)])

    def whole(self) -> Box:
        """Box over every sample."""
        return tuple(slice(0, len(a)) for a in self.axes)

    def plane(self) -> Box:
        """Box over the first z plane (for drawing what is the same in every slice)."""
        return slice(0, len(self.axes[0])), slice(0, len(self.axes[1])), slice(0, 1)

    def box(self, centre: np.ndarray, reach: np.ndarray) -> Box | None:
        """Index box covering world points within `reach` (per axis) of `centre`; None if outside the grid."""
        box = []
        for axis, c, r in zip(self.axes, centre, np.broadcast_to(reach, (3,))):
            lo, hi = np.searchsorted(axis, [c - r, c + r])
            if hi <= lo:
                return None
            box.append(slice(int(lo), int(hi)))
        return tuple(box)

    def coords(self, box: Box) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """World x, y, z of the samples in `box`, shaped to broadcast against each other."""
        x, y, z = (a[b] for a, b in zip(self.axes, box))
        return x[:, None, None], y[None, :, None], z[None, None, :]

    def paint(self, box: Box, mask: np.ndarray, hu: float, label: int = 0) -> None:
        """Set HU and label where `mask` (shaped like `box`) is true."""
        mask = np.broadcast_to(mask, tuple(s.stop - s.start for s in box))
        self.hu[box][mask] = hu
        self.label[box][mask] = label

    def extrude_first_plane(self) -> None:
        """Copy the first z plane's HU into every plane (after drawing something constant along z)."""
        self.hu[:] = self.hu[:, :, :1]


@dataclass(frozen=True)
class Blob:
    """A deformed ellipsoid: smooth low-frequency random displacement of its normalised coordinates."""

    centre: np.ndarray
    axes: np.ndarray
    rotation: np.ndarray  # columns: the blob's own axes in world coordinates
    wobble_amp: np.ndarray  # (k, 3)
    wobble_freq: np.ndarray  # (k, 3)
    wobble_phase: np.ndarray  # (k,)

    @property
    def extruded(self) -> bool:
        """True for a prism running through the whole volume along z (same cross-section in every slice)."""
        return bool(self.axes[2] >= LONG)

    def reach(self) -> np.ndarray:
        """Half-extent (mm) along each world axis of a box around the centre that surely contains the shape."""
        half = np.sqrt(((self.rotation * self.axes[None, :]) ** 2).sum(axis=1))
        return half * (1.0 + float(np.linalg.norm(np.abs(self.wobble_amp).sum(axis=0)))) + 1.0

    def resized(self, delta_mm: float) -> Blob:
        """Same shape with every semi-axis changed by `delta_mm` (negative: an inner layer)."""
        return Blob(self.centre, np.maximum(self.axes + delta_mm, 0.5), self.rotation,
                    self.wobble_amp, self.wobble_freq, self.wobble_phase)

    def radius(self, canvas: Canvas, box: Box, scale: float = 1.0) -> np.ndarray:
        """Normalised distance from the centre over `box`: below 1 inside, 1 on the (deformed) surface."""
        if self.extruded and box[2].stop - box[2].start > 1:
            plane = self.radius(canvas, (box[0], box[1], slice(box[2].start, box[2].start + 1)), scale)
            return np.broadcast_to(plane, tuple(s.stop - s.start for s in box))
        world = canvas.coords(box)
        offset = [w - c for w, c in zip(world, self.centre)]
        q = [sum(self.rotation[j, i] * offset[j] for j in range(3)) / (self.axes[i] * scale) for i in range(3)]
        moved = list(q)
        for amp, freq, phase in zip(self.wobble_amp, self.wobble_freq, self.wobble_phase):
            wave = np.sin(freq[0] * q[0] + freq[1] * q[1] + freq[2] * q[2] + phase)
            moved = [m + a * wave for m, a in zip(moved, amp)]
        return np.sqrt(moved[0] ** 2 + moved[1] ** 2 + moved[2] ** 2)

    def inside(self, canvas: Canvas, box: Box, scale: float = 1.0) -> np.ndarray:
        """Boolean mask over `box` of samples inside the blob (scaled about its centre by `scale`)."""
        return self.radius(canvas, box, scale) < 1.0

    def box(self, canvas: Canvas) -> Box | None:
        """Grid box around the blob."""
        return canvas.box(self.centre, self.reach())


def paint_blob(canvas: Canvas, blob: Blob, hu: float, label: int = 0, scale: float = 1.0,
               within: Within | None = None) -> None:
    """Paint a blob (optionally only where `within(box)` holds)."""
    box = blob.box(canvas)
    if box is None:
        return
    mask = blob.inside(canvas, box, scale)
    if within is not None:
        mask = mask & within(box)
    canvas.paint(box, mask, hu, label)


def paint_tube(canvas: Canvas, points: np.ndarray, radii: np.ndarray, hu: float, label: int = 0,
               within: Within | None = None) -> None:
    """Paint a tube as a union of ellipsoids (semi-axes `radii[i]`, world-aligned) centred on `points[i]`."""
    for centre, radius in zip(points, np.broadcast_to(radii, points.shape)):
        box = canvas.box(centre, radius)
        if box is None:
            continue
        x, y, z = canvas.coords(box)
        mask = ((x - centre[0]) / radius[0]) ** 2 + ((y - centre[1]) / radius[1]) ** 2 \
            + ((z - centre[2]) / radius[2]) ** 2 < 1.0
        if within is not None:
            mask = mask & within(box)
        canvas.paint(box, mask, hu, label)
