"""Synthetic abdominal CT phantoms: organs as smooth random shapes at realistic HU, from a seed, no download needed.

World frame is nibabel's RAS+ (x to the patient's right, y anterior, z superior), in mm, centred on the volume.
Organ label ids come from the `phantom` concept card. Shapes are drawn in order on a 2x in-plane grid, later
structures replacing earlier ones, so image and label always agree; the grid is then averaged (partial volume).
"""
from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
from scipy.ndimage import gaussian_filter
from scipy.spatial.transform import Rotation

from medclipsam.data.concepts import card_text, load_card
from medclipsam.errors import InputError, OutputExistsError

PHANTOM_CARD = "phantom"
DEFAULT_SHAPE = (128, 128, 32)
DEFAULT_SPACING = (3.0, 3.0, 6.0)
_SUPERSAMPLE = 2
_DESIGN_FOV_MM = (360.0, 300.0, 192.0)  # extent the anatomy is laid out in; smaller grids get it scaled down
_HU_RANGE = (-1024.0, 3071.0)
_LONG = 1.0e5  # semi-axis used for structures that run through the whole volume (body, spine)


@dataclass
class Phantom:
    """One synthetic CT: HU image and uint8 label on the same (X, Y, Z) RAS grid, with its affine and label names."""

    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]
    label_names: dict[int, str]

    def to_nifti(self, image_path: str | Path, label_path: str | Path, overwrite: bool = False) -> None:
        """Write the image (int16 HU) and label (uint8) as NIfTI files with the phantom's affine, atomically."""
        hu = np.clip(np.rint(self.image), *_HU_RANGE).astype(np.int16)
        _save_nifti(hu, self.affine, Path(image_path), overwrite)
        _save_nifti(self.label.astype(np.uint8), self.affine, Path(label_path), overwrite)


def phantom_affine(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> np.ndarray:
    """RAS affine with the spacing on its diagonal and the origin placed so the volume's centre is world (0, 0, 0)."""
    affine = np.diag([*map(float, spacing), 1.0])
    affine[:3, 3] = -(np.asarray(shape, float) - 1.0) / 2.0 * np.asarray(spacing, float)
    return affine


def make_phantom(seed: int, shape: tuple[int, int, int] = DEFAULT_SHAPE,
                 spacing: tuple[float, float, float] = DEFAULT_SPACING) -> Phantom:
    """An abdomen-like contrast CT volume from `seed` (same seed, same volume); anatomy varies with the seed.

    Anatomy is laid out in mm for a field of view of about 360 x 300 x 192 mm (the default grid covers
    384 x 384 x 192 mm); a smaller field of view gets it scaled down per axis so every organ stays in view.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(None, f"phantom seed {seed!r} is not a non-negative integer", "Pass seed=0, 1, 2, ...")
    shape, spacing = _checked_grid(shape, spacing)
    card = load_card(PHANTOM_CARD)
    rng = np.random.default_rng(seed)
    canvas = _Canvas(shape, spacing)
    layout = _Layout(rng, canvas)
    ids = {name: card.resolve(name).label_id for name in card.names()}
    _draw_anatomy(canvas, layout, ids)
    image, label = canvas.downsample()
    image = _scanner_look(image, rng)
    return Phantom(image=image, label=label, affine=phantom_affine(shape, spacing), spacing=spacing,
                   label_names=card.label_map())


def write_phantom_dataset(root: str | Path, n: int, seed: int = 0, shape: tuple[int, int, int] = DEFAULT_SHAPE,
                          spacing: tuple[float, float, float] = DEFAULT_SPACING, overwrite: bool = False,
                          n_validation: int = 0) -> Path:
    """Write `n` phantoms (case i from seed + i) as an MSD-layout dataset with dataset.json and card.yaml, plus
    `n_validation` held-out labelled cases (seeds after the training ones) under "validation".

    Returns the path of dataset.json.
    """
    if n < 1:
        raise InputError(root, f"asked for {n} phantom cases", "Ask for at least one case (n >= 1)")
    root = Path(root)
    datalist_path = root / "dataset.json"
    if datalist_path.exists() and not overwrite:
        raise OutputExistsError(datalist_path, "a dataset already exists here; pass overwrite=True to replace it")
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    card = load_card(PHANTOM_CARD)
    training, validation = [], []
    for i in range(n + n_validation):
        name = f"phantom_{i:03d}.nii.gz"
        make_phantom(seed + i, shape, spacing).to_nifti(root / "imagesTr" / name, root / "labelsTr" / name, overwrite)
        (training if i < n else validation).append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    datalist = {
        "name": card.name,
        "description": f"{card.title}: {n} training + {n_validation} validation cases, seeds {seed}..{seed + n + n_validation - 1}",
        "licence": card.licence,
        "tensorImageSize": "3D",
        "modality": {"0": card.modality},
        "labels": {"0": "background", **{str(i): name for i, name in card.label_map().items()}},
        "numTraining": n,
        "numTest": 0,
        "training": training,
        "validation": validation,
        "test": [],
    }
    _write_text(root / "card.yaml", card_text(PHANTOM_CARD), overwrite)
    _write_text(datalist_path, json.dumps(datalist, indent=2) + "\n", overwrite=True)
    return datalist_path


# ----------------------------------------------------------------------------------------------- drawing surface


class _Canvas:
    """HU and label arrays on a grid supersampled in-plane, with world coordinates of every sample."""

    def __init__(self, shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> None:
        self.shape = shape
        self.spacing = np.asarray(spacing, float)
        origin = phantom_affine(shape, spacing)[:3, 3]
        factors = (_SUPERSAMPLE, _SUPERSAMPLE, 1)
        self.axes = [origin[d] + ((np.arange(shape[d] * f) + 0.5) / f - 0.5) * spacing[d]
                     for d, f in enumerate(factors)]
        fine = tuple(len(a) for a in self.axes)
        self.hu = np.full(fine, -1000.0, np.float32)
        self.label = np.zeros(fine, np.uint8)
        self.fov = np.asarray(shape, float) * self.spacing

    def box(self, centre: np.ndarray, reach: np.ndarray) -> tuple[slice, slice, slice] | None:
        """Index box covering world points within `reach` (per axis) of `centre`; None if outside the grid."""
        box = []
        for axis, c, r in zip(self.axes, centre, np.broadcast_to(reach, (3,))):
            lo, hi = np.searchsorted(axis, [c - r, c + r])
            if hi <= lo:
                return None
            box.append(slice(int(lo), int(hi)))
        return tuple(box)

    def coords(self, box: tuple[slice, slice, slice]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """World x, y, z of the samples in `box`, shaped to broadcast against each other."""
        x, y, z = (a[b] for a, b in zip(self.axes, box))
        return x[:, None, None], y[None, :, None], z[None, None, :]

    def paint(self, box: tuple[slice, slice, slice], mask: np.ndarray, hu: float, label: int = 0) -> None:
        """Set HU and label where `mask` (shaped like `box`) is true."""
        mask = np.broadcast_to(mask, tuple(s.stop - s.start for s in box))
        self.hu[box][mask] = hu
        self.label[box][mask] = label

    def downsample(self) -> tuple[np.ndarray, np.ndarray]:
        """Average HU over each voxel's in-plane samples (partial volume); label by majority of the samples."""
        X, Y, Z = self.shape
        f = _SUPERSAMPLE
        hu = self.hu.reshape(X, f, Y, f, Z).mean(axis=(1, 3), dtype=np.float32)
        blocks = self.label.reshape(X, f, Y, f, Z)
        counts = np.stack([(blocks == v).sum(axis=(1, 3)) for v in range(int(self.label.max()) + 1)])
        return hu, counts.argmax(axis=0).astype(np.uint8)


@dataclass(frozen=True)
class _Blob:
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
        return bool(self.axes[2] >= _LONG)

    def reach(self) -> np.ndarray:
        """Half-extent (mm) along each world axis of a box around the centre that surely contains the shape."""
        half = np.sqrt(((self.rotation * self.axes[None, :]) ** 2).sum(axis=1))
        return half * (1.0 + float(np.linalg.norm(np.abs(self.wobble_amp).sum(axis=0)))) + 1.0

    def resized(self, delta_mm: float) -> _Blob:
        """Same shape with every semi-axis changed by `delta_mm` (negative: an inner layer)."""
        return _Blob(self.centre, np.maximum(self.axes + delta_mm, 0.5), self.rotation,
                     self.wobble_amp, self.wobble_freq, self.wobble_phase)

    def radius(self, canvas: _Canvas, box: tuple[slice, slice, slice], scale: float = 1.0) -> np.ndarray:
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

    def inside(self, canvas: _Canvas, box: tuple[slice, slice, slice], scale: float = 1.0) -> np.ndarray:
        """Boolean mask over `box` of samples inside the blob (scaled about its centre by `scale`)."""
        return self.radius(canvas, box, scale) < 1.0

    def box(self, canvas: _Canvas) -> tuple[slice, slice, slice] | None:
        """Grid box around the blob."""
        return canvas.box(self.centre, self.reach())


class _Layout:
    """Per-seed anatomy variation: body size, global rotation/shift, organ jitter, contrast phase."""

    def __init__(self, rng: np.random.Generator, canvas: _Canvas) -> None:
        self.rng = rng
        fit = np.minimum(1.0, canvas.fov / np.asarray(_DESIGN_FOV_MM))
        self.body_axes = np.array([rng.uniform(138, 165), rng.uniform(100, 120)])
        self.scale = fit * np.array([self.body_axes[0] / 150.0, self.body_axes[1] / 110.0, 1.0])
        self.in_plane = self.scale * np.array([1.0, 1.0, 1.0 / self.scale[2]])  # for vertical tube radii
        self.turn = Rotation.from_euler("z", rng.uniform(-4.0, 4.0), degrees=True).as_matrix()
        self.shift = np.array([rng.uniform(-10, 10), rng.uniform(-8, 8), 0.0]) * fit
        self.phase = rng.uniform(0.0, 1.0)  # 0: late arterial, 1: portal venous
        self.z_top = canvas.axes[2][-1] + canvas.spacing[2]
        self.z_bottom = canvas.axes[2][0] - canvas.spacing[2]

    def point(self, xyz: tuple[float, float, float], jitter_mm: float = 0.0) -> np.ndarray:
        """World position of an anatomical position (mm, before body scaling), with optional jitter."""
        local = np.asarray(xyz, float) + np.clip(self.rng.normal(0.0, jitter_mm, 3), -2 * jitter_mm, 2 * jitter_mm)
        return self.turn @ (local * self.scale) + self.shift

    def hu(self, mean: float, sd: float) -> float:
        """A tissue's HU for this case."""
        return float(mean + self.rng.normal(0.0, sd))

    def blob(self, centre: tuple[float, float, float], axes: tuple[float, float, float],
             angles_deg: tuple[float, float, float] = (0.0, 0.0, 0.0), jitter_mm: float = 8.0,
             size_var: float = 0.15, wobble: float = 0.07, waves: int = 3) -> _Blob:
        """A randomly varied organ-like blob around an anatomical position, size and orientation (xyz Euler)."""
        rng = self.rng
        size = np.asarray(axes, float) * rng.uniform(1 - size_var, 1 + size_var) * rng.uniform(0.95, 1.05, 3)
        extruded = axes[2] >= _LONG
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
            size[2] = _LONG
        return _Blob(self.point(centre, jitter_mm), size, rotation, amp, freq,
                     rng.uniform(0, 2 * np.pi, waves))


def _paint_blob(canvas: _Canvas, blob: _Blob, hu: float, label: int = 0, scale: float = 1.0,
                within: Callable[[tuple[slice, slice, slice]], np.ndarray] | None = None) -> None:
    """Paint a blob (optionally only where `within(box)` holds)."""
    box = blob.box(canvas)
    if box is None:
        return
    mask = blob.inside(canvas, box, scale)
    if within is not None:
        mask = mask & within(box)
    canvas.paint(box, mask, hu, label)


def _paint_tube(canvas: _Canvas, points: np.ndarray, radii: np.ndarray, hu: float, label: int = 0,
                within: Callable[[tuple[slice, slice, slice]], np.ndarray] | None = None) -> None:
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


def _curve(layout: _Layout, knots: list[tuple[float, float, float]], step_mm: float, jitter_mm: float) -> np.ndarray:
    """Points every ~`step_mm` along a piecewise-linear path through jittered anatomical knots (world mm)."""
    world = np.stack([layout.point(k, jitter_mm) for k in knots])
    pieces = []
    for a, b in zip(world[:-1], world[1:]):
        count = max(2, int(np.ceil(np.linalg.norm(b - a) / step_mm)) + 1)
        pieces.append(a + np.linspace(0.0, 1.0, count)[:, None] * (b - a))
    return np.concatenate(pieces)


# ----------------------------------------------------------------------------------------------- anatomy


def _draw_anatomy(canvas: _Canvas, layout: _Layout, ids: dict[str, int]) -> None:
    """Body wall, gut, muscles, organs, vessels and bone, in an order where later structures carve earlier ones."""
    body = _draw_body(canvas, layout)
    _draw_table(canvas, layout, body)
    _draw_bowel(canvas, layout, body.cavity)
    _draw_colon(canvas, layout, body.cavity)
    _draw_lung_bases(canvas, layout, body.cavity)
    _draw_back_muscles(canvas, layout, body.deep)
    _draw_organs(canvas, layout, ids, body.cavity)
    _draw_vessels(canvas, layout, ids)
    _draw_spine(canvas, layout)
    _draw_ribs(canvas, layout, body)


@dataclass(frozen=True)
class _BodyRegions:
    """In-plane masks of the body (constant along z): everything, under the fat, and the abdominal cavity."""

    body_plane: np.ndarray
    deep_plane: np.ndarray
    cavity_plane: np.ndarray
    depth_plane: np.ndarray  # approximate depth under the skin, mm
    fat_mm: float
    wall_mm: float

    def deep(self, box: tuple[slice, slice, slice]) -> np.ndarray:
        """Mask over `box` of the part under the subcutaneous fat."""
        return self.deep_plane[box[0], box[1], :]

    def cavity(self, box: tuple[slice, slice, slice]) -> np.ndarray:
        """Mask over `box` of the abdominal cavity inside the muscular wall."""
        return self.cavity_plane[box[0], box[1], :]


def _draw_body(canvas: _Canvas, layout: _Layout) -> _BodyRegions:
    """Skin outline with subcutaneous fat (thicker in larger bodies), a muscular wall and fat inside."""
    body = layout.blob((0.0, 0.0, 0.0), (150.0, 110.0, _LONG), jitter_mm=0.0, size_var=0.0, wobble=0.02)
    fat = 8.0 + 16.0 * (layout.body_axes[0] - 138.0) / 27.0 + layout.rng.uniform(0.0, 6.0)
    wall = layout.rng.uniform(8.0, 13.0)
    plane = (slice(0, len(canvas.axes[0])), slice(0, len(canvas.axes[1])), slice(0, 1))
    depth = (1.0 - body.radius(canvas, plane)) * float(body.axes[:2].mean())
    regions = _BodyRegions(body.inside(canvas, plane), body.resized(-fat).inside(canvas, plane),
                           body.resized(-fat - wall).inside(canvas, plane), depth, fat, wall)
    canvas.paint(plane, regions.body_plane, layout.hu(-100, 6))
    canvas.paint(plane, regions.deep_plane, layout.hu(50, 4))
    canvas.paint(plane, regions.cavity_plane, layout.hu(-95, 5))
    canvas.hu[:] = canvas.hu[:, :, :1]
    return regions


def _draw_table(canvas: _Canvas, layout: _Layout, body: _BodyRegions) -> None:
    """The scanner table: a thin curved plate a few mm behind the patient's back."""
    plane = (slice(0, len(canvas.axes[0])), slice(0, len(canvas.axes[1])), slice(0, 1))
    x, y, _ = canvas.coords(plane)
    back = y[0, :, 0][body.body_plane.any(axis=(0, 2))].min()
    curve = back - layout.rng.uniform(4.0, 12.0) + (x - layout.shift[0]) ** 2 / 1200.0
    plate = (y < curve) & (y > curve - 5.0) & (np.abs(x - layout.shift[0]) < 190.0)
    canvas.paint(plane, plate, layout.hu(180, 20))
    canvas.hu[:] = canvas.hu[:, :, :1]


def _draw_bowel(canvas: _Canvas, layout: _Layout, cavity: Callable) -> None:
    """Small-bowel loops crowding the mid and lower cavity: enhancing wall around fluid, air or chyme."""
    rng = layout.rng
    wall_hu = layout.hu(45 + 25 * layout.phase, 5)
    contents = {"fluid": (15.0, 0.55), "air": (-950.0, 0.15), "chyme": (-150.0, 0.3)}
    kinds = list(contents)
    weights = [w for _, w in contents.values()]
    for _ in range(90):
        x, y = rng.uniform(-110, 110), rng.uniform(-20, 85)
        z = -120.0 + 150.0 * rng.beta(1.0, 1.5)
        radius = rng.uniform(10, 16)
        loop = layout.blob((x, y, z), (radius, radius * rng.uniform(0.7, 1.4), radius * rng.uniform(1.0, 2.0)),
                           angles_deg=(0, 0, rng.uniform(0, 180)), jitter_mm=0.0, wobble=0.12)
        kind = kinds[rng.choice(len(kinds), p=weights)]
        _paint_blob(canvas, loop, wall_hu, within=cavity)
        _paint_blob(canvas, loop.resized(-2.5), layout.hu(contents[kind][0], 10), within=cavity)


def _draw_colon(canvas: _Canvas, layout: _Layout, cavity: Callable) -> None:
    """Ascending, transverse and descending colon along the flanks and front, holding air and mottled faeces."""
    path = _curve(layout, [(95.0, -5.0, -130.0), (90.0, 0.0, -15.0), (60.0, 45.0, -20.0), (0.0, 62.0, -35.0),
                           (-60.0, 45.0, 5.0), (-92.0, 5.0, 15.0), (-92.0, -5.0, -130.0)], step_mm=6.0, jitter_mm=5.0)
    radius = layout.rng.uniform(17.0, 23.0)
    wall_hu = layout.hu(40 + 20 * layout.phase, 5)
    _paint_tube(canvas, path, np.array([radius, radius, radius]) * layout.scale, wall_hu, within=cavity)
    for point in path:
        content = -950.0 if layout.rng.uniform() < 0.45 else layout.hu(-200, 60)
        lumen = np.array([radius - 3.0] * 3) * layout.scale * layout.rng.uniform(0.8, 1.0)
        _paint_tube(canvas, point[None], lumen, content, within=cavity)


def _draw_lung_bases(canvas: _Canvas, layout: _Layout, cavity: Callable) -> None:
    """Both lung bases behind and around the diaphragm domes in the top slices (liver and spleen carve them)."""
    for side in (1.0, -1.0):
        lung = layout.blob((side * 72.0, -30.0, 165.0), (78.0, 72.0, 85.0), jitter_mm=6.0, size_var=0.05,
                           wobble=0.04)
        _paint_blob(canvas, lung, layout.hu(-860, 15), within=cavity)


def _draw_back_muscles(canvas: _Canvas, layout: _Layout, deep: Callable) -> None:
    """Paraspinal muscles behind the spine (under the fat) and psoas muscles growing beside it towards the pelvis."""
    muscle = layout.hu(50, 4)
    for side in (1.0, -1.0):
        erector = layout.blob((side * 34.0, -82.0, 0.0), (26.0, 20.0, _LONG), jitter_mm=2.0, size_var=0.1,
                              wobble=0.05)
        _paint_blob(canvas, erector, muscle, within=deep)
        path = _curve(layout, [(side * 28.0, -42.0, 30.0), (side * 40.0, -38.0, -60.0), (side * 50.0, -30.0, -130.0)],
                      step_mm=4.0, jitter_mm=2.0)
        grow = np.clip((30.0 - path[:, 2]) / 130.0, 0.0, 1.0)[:, None]
        radii = np.array([4.0, 4.0, 6.0]) + grow * np.array([18.0, 15.0, 0.0])
        _paint_tube(canvas, path, radii * layout.in_plane, muscle)


def _draw_organs(canvas: _Canvas, layout: _Layout, ids: dict[str, int], cavity: Callable) -> None:
    """Solid and hollow organs with their labels, kept inside the abdominal cavity."""
    p = layout.phase
    liver_hu = layout.hu(55 + 30 * p, 4)
    for lobe in (layout.blob((62.0, 2.0, 40.0), (60.0, 76.0, 62.0), angles_deg=(0, 0, -10)),
                 layout.blob((8.0, 48.0, 55.0), (50.0, 30.0, 32.0), angles_deg=(0, 0, 15), jitter_mm=5.0),
                 layout.blob((20.0, 5.0, 45.0), (22.0, 24.0, 34.0), jitter_mm=3.0, size_var=0.1)):  # caudate
        _paint_blob(canvas, lobe, liver_hu, ids["liver"], within=cavity)
    _draw_liver_vessels(canvas, layout, ids["liver"])

    gallbladder = layout.blob((48.0, 42.0, -8.0), (14.0, 16.0, 30.0), angles_deg=(20, 0, 20), jitter_mm=5.0)
    _paint_blob(canvas, gallbladder, layout.hu(12, 4), ids["gallbladder"], within=cavity)

    spleen = layout.blob((-74.0, -34.0, 45.0), (20.0, 48.0, 46.0), angles_deg=(0, 0, 40), jitter_mm=5.0)
    _paint_blob(canvas, spleen, layout.hu(60 + 45 * p, 4), ids["spleen"], within=cavity)

    _draw_stomach(canvas, layout, ids["stomach"], cavity)

    pancreas = _curve(layout, [(24.0, 8.0, -20.0), (0.0, 22.0, -10.0), (-35.0, 15.0, 0.0), (-70.0, -12.0, 12.0)],
                      step_mm=3.0, jitter_mm=4.0)
    along = np.linspace(0.0, 1.0, len(pancreas))[:, None]
    radii = (np.array([16.0, 15.0, 16.0]) * (1 - along) + np.array([10.0, 9.0, 10.0]) * along) \
        * layout.rng.uniform(0.9, 1.1)
    _paint_tube(canvas, pancreas, radii * layout.scale, layout.hu(75 - 25 * p, 4), ids["pancreas"], within=cavity)

    cortex = layout.hu(160 + 15 * p, 5)
    medulla = layout.hu(95 + 60 * p, 5)
    for side, name, z in ((1.0, "right kidney", -25.0), (-1.0, "left kidney", -12.0)):
        kidney = layout.blob((side * 62.0, -30.0, z), (25.0, 21.0, 52.0), angles_deg=(0, side * 12, side * 30),
                             jitter_mm=6.0, wobble=0.05)
        _paint_blob(canvas, kidney, cortex, ids[name], within=cavity)
        _paint_blob(canvas, kidney, medulla, ids[name], scale=0.62, within=cavity)


def _draw_liver_vessels(canvas: _Canvas, layout: _Layout, liver: int) -> None:
    """Hepatic veins fanning out from the IVC and portal vein branches from the hilum, drawn inside the liver only."""
    p = layout.phase

    def in_liver(box: tuple[slice, slice, slice]) -> np.ndarray:
        return canvas.label[box] == liver

    hepatic_hu, portal_hu = layout.hu(65 + 100 * p, 6), layout.hu(110 + 70 * p, 6)
    for tip in ((95.0, 10.0, 45.0), (45.0, 55.0, 40.0), (-15.0, 50.0, 62.0)):
        vein = _curve(layout, [(24.0, -14.0, 85.0), tip], step_mm=3.0, jitter_mm=4.0)
        radii = np.linspace(6.0, 2.5, len(vein))[:, None] * np.ones(3) * layout.scale
        _paint_tube(canvas, vein, radii, hepatic_hu, liver, within=in_liver)
    for tip in ((95.0, -5.0, 20.0), (15.0, 45.0, 40.0)):
        branch = _curve(layout, [(30.0, 5.0, 5.0), (50.0, 10.0, 20.0), tip], step_mm=3.0, jitter_mm=4.0)
        radii = np.linspace(7.0, 3.0, len(branch))[:, None] * np.ones(3) * layout.scale
        _paint_tube(canvas, branch, radii, portal_hu, liver, within=in_liver)


def _draw_stomach(canvas: _Canvas, layout: _Layout, label: int, cavity: Callable) -> None:
    """Stomach (fundus/body and antrum): enhancing wall, fluid content and, often, an anterior air pocket."""
    parts = [layout.blob((-52.0, 18.0, 48.0), (38.0, 34.0, 44.0), angles_deg=(0, 0, -20), jitter_mm=6.0),
             layout.blob((-12.0, 52.0, 8.0), (38.0, 18.0, 22.0), angles_deg=(0, 0, -25), jitter_mm=5.0)]
    wall = layout.hu(60 + 20 * layout.phase, 5)
    fluid = layout.hu(12, 5)
    level = layout.rng.uniform(5.0, 45.0) * layout.scale[1] + layout.shift[1]  # supine: air rises anteriorly
    has_air = layout.rng.uniform() < 0.65

    def above_level(box: tuple[slice, slice, slice]) -> np.ndarray:
        return cavity(box) & (canvas.coords(box)[1] > level)

    for part in parts:
        _paint_blob(canvas, part, wall, label, within=cavity)
    for part in parts:
        lumen = part.resized(-4.0)
        _paint_blob(canvas, lumen, fluid, label, within=cavity)
        if has_air:
            _paint_blob(canvas, lumen, -980.0, label, within=above_level)


def _draw_vessels(canvas: _Canvas, layout: _Layout, ids: dict[str, int]) -> None:
    """Aorta and IVC down to their bifurcations, then unlabelled common iliac vessels."""
    p = layout.phase
    top, bottom = max(layout.z_top / layout.scale[2], 100.0), min(layout.z_bottom / layout.scale[2], -110.0)
    bifurcation = layout.rng.uniform(-66.0, -54.0)
    aorta_hu, ivc_hu = layout.hu(250 - 50 * p, 6), layout.hu(50 + 100 * p, 6)
    r_aorta = layout.rng.uniform(9.5, 12.5)
    aorta = _curve(layout, [(-10.0, -18.0, top), (-12.0, -12.0, bifurcation)], 3.0, 2.0)
    _paint_tube(canvas, aorta, np.array([r_aorta, r_aorta, 4.0]) * layout.in_plane, aorta_hu, ids["aorta"])
    ivc = _curve(layout, [(22.0, -18.0, top), (18.0, -20.0, bifurcation - 6.0)], 3.0, 2.0)
    _paint_tube(canvas, ivc, np.array([13.0, 10.0, 4.0]) * layout.in_plane, ivc_hu, ids["inferior vena cava"])
    for side in (1.0, -1.0):
        artery = _curve(layout, [(-12.0, -12.0, bifurcation + 3), (side * 45.0, 0.0, bottom)], 3.0, 1.0)
        _paint_tube(canvas, artery, np.array([7.0, 7.0, 4.0]) * layout.in_plane, aorta_hu)
        vein = _curve(layout, [(18.0, -20.0, bifurcation - 3), (side * 40.0, -22.0, bottom)], 3.0, 1.0)
        _paint_tube(canvas, vein, np.array([9.0, 8.0, 4.0]) * layout.in_plane, ivc_hu)


def _draw_spine(canvas: _Canvas, layout: _Layout) -> None:
    """Lumbar vertebrae: cortical shell, cancellous body, discs, neural arch with canal and spinous process."""
    rng = layout.rng
    cortical, cancellous = layout.hu(700, 40), layout.hu(230, 20)
    disc_hu, canal_hu = layout.hu(85, 6), layout.hu(20, 5)
    vertebra = layout.blob((0.0, -50.0, 0.0), (21.0, 17.0, _LONG), jitter_mm=1.5, size_var=0.08, wobble=0.02)
    arch = layout.blob((0.0, -76.0, 0.0), (14.0, 13.0, _LONG), jitter_mm=1.0, size_var=0.08, wobble=0.02)
    spinous = layout.blob((0.0, -93.0, 0.0), (4.5, 13.0, _LONG), jitter_mm=1.0, size_var=0.1, wobble=0.02)
    _paint_blob(canvas, arch, cortical * 0.8)
    _paint_blob(canvas, spinous, cortical * 0.8)
    _paint_blob(canvas, arch.resized(-5.5), canal_hu)
    _paint_blob(canvas, vertebra, cortical)
    _paint_blob(canvas, vertebra.resized(-3.0), cancellous)
    period, disc = rng.uniform(33.0, 37.0), rng.uniform(7.0, 10.0)
    start = rng.uniform(0.0, period)

    def in_disc(box: tuple[slice, slice, slice]) -> np.ndarray:
        return np.mod(canvas.coords(box)[2] - start, period) < disc

    _paint_blob(canvas, vertebra.resized(0.5), disc_hu, within=in_disc)


def _draw_ribs(canvas: _Canvas, layout: _Layout, body: _BodyRegions) -> None:
    """Lower ribs cut obliquely: oval bony arcs (cortex around marrow) in the muscular wall, running down and
    forwards from beside the spine, so each slice shows a few short arcs."""
    rng = layout.rng
    whole = tuple(slice(0, len(a)) for a in canvas.axes)
    x, y, z = canvas.coords(whole)
    centre = layout.shift
    from_back = np.abs(np.angle(np.exp(1j * (np.arctan2(y - centre[1], x - centre[0]) + np.pi / 2))))
    along = (from_back > 0.35) & (from_back < 2.2)  # radians from the posterior midline
    period, height, thickness = rng.uniform(28.0, 34.0), rng.uniform(9.0, 12.0), min(9.0, body.wall_mm)
    offset = np.mod(z + 40.0 * from_back - rng.uniform(0.0, period), period) - height / 2
    radial = body.depth_plane - (body.fat_mm + body.wall_mm / 2)
    oval = (offset / (height / 2)) ** 2 + (radial / (thickness / 2)) ** 2
    rib = along & (z > rng.uniform(-30.0, -10.0) + 30.0 * from_back)
    canvas.paint(whole, rib & (oval < 1.0), layout.hu(650, 40))
    canvas.paint(whole, rib & (oval < 0.35), layout.hu(250, 30))


def _scanner_look(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Slight reconstruction blur plus correlated Gaussian noise (10-20 HU), clipped to the CT range."""
    image = gaussian_filter(image, sigma=(0.4, 0.4, 0.0))
    noise = gaussian_filter(rng.standard_normal(image.shape).astype(np.float32), sigma=(0.6, 0.6, 0.0))
    noise *= rng.uniform(10.0, 20.0) / max(float(noise.std()), 1e-6)
    return np.clip(image + noise, *_HU_RANGE).astype(np.float32)


# ----------------------------------------------------------------------------------------------- files


def _checked_grid(shape: tuple[int, int, int], spacing: tuple[float, float, float]
                  ) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    if len(shape) != 3 or any(int(s) < 8 for s in shape):
        raise InputError(None, f"phantom shape {tuple(shape)} is not 3 sizes of at least 8 voxels",
                         "Pass shape=(X, Y, Z), e.g. (128, 128, 32)")
    if len(spacing) != 3 or any(not np.isfinite(s) or s <= 0 for s in spacing):
        raise InputError(None, f"phantom spacing {tuple(spacing)} is not 3 positive sizes in mm",
                         "Pass spacing=(sx, sy, sz) in mm, e.g. (3.0, 3.0, 6.0)")
    return tuple(int(s) for s in shape), tuple(float(s) for s in spacing)


def _save_nifti(data: np.ndarray, affine: np.ndarray, path: Path, overwrite: bool) -> None:
    """Write a NIfTI file with a scanner-coordinate affine via a temporary file and an atomic rename."""
    if path.exists() and not overwrite:
        raise OutputExistsError(path, "file exists; pass overwrite=True to replace it")
    image = nib.Nifti1Image(data, affine)
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    image.header.set_xyzt_units("mm")
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    _atomic(path, suffix, lambda tmp: nib.save(image, tmp))


def _write_text(path: Path, text: str, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise OutputExistsError(path, "file exists; pass overwrite=True to replace it")
    _atomic(path, path.suffix, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _atomic(path: Path, suffix: str, write: Callable[[str], None]) -> None:
    """Run `write` on a temporary file next to `path`, then move it into place in one step."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = str(path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp{suffix}"))
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
