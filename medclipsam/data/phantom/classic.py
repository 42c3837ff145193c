"""The classic phantom: one abdomen-like CT per seed on any small grid (default 128 x 128 x 32 at 3 x 3 x 6 mm),
centred on the world origin, its anatomy scaled down when the field of view is smaller than about 360 x 300 x 192 mm.

World frame is nibabel's RAS+ (x to the patient's right, y anterior, z superior), in mm. Shapes are drawn on a 2x
in-plane grid, which is then averaged (partial volume). Tests, demos and a shipped model depend on its exact output.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from scipy.ndimage import gaussian_filter

from medclipsam.data.concepts import load_card
from medclipsam.errors import InputError

from .anatomy import BodyRegions, draw_anatomy
from .canvas import HU_RANGE, Canvas
from .files import save_nifti
from .layout import Layout

if TYPE_CHECKING:
    from .geometry import ScannerGeometry

PHANTOM_CARD = "phantom"
DEFAULT_SHAPE = (128, 128, 32)
DEFAULT_SPACING = (3.0, 3.0, 6.0)
_SUPERSAMPLE = 2


@dataclass
class Phantom:
    """One synthetic CT: HU image and uint8 label on the same (X, Y, Z) RAS grid, with its affine and label names
    (and, for a scanner phantom, the scanner geometry it was made with)."""

    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]
    label_names: dict[int, str]
    geometry: ScannerGeometry | None = None

    def to_nifti(self, image_path: str | Path, label_path: str | Path, overwrite: bool = False) -> None:
        """Write the image (int16 HU) and label (uint8) as NIfTI files with the phantom's affine, atomically."""
        hu = np.clip(np.rint(self.image), *HU_RANGE).astype(np.int16)
        save_nifti(hu, self.affine, Path(image_path), overwrite)
        save_nifti(self.label.astype(np.uint8), self.affine, Path(label_path), overwrite)


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
    For CTs whose geometry varies like real scanners', use `make_scanner_phantom`.
    """
    checked_seed(seed)
    shape, spacing = _checked_grid(shape, spacing)
    card = load_card(PHANTOM_CARD)
    rng = np.random.default_rng(seed)
    canvas = Canvas.supersampled(shape, spacing, phantom_affine(shape, spacing)[:3, 3],
                                 (_SUPERSAMPLE, _SUPERSAMPLE, 1))
    z_range = (canvas.axes[2][0] - spacing[2], canvas.axes[2][-1] + spacing[2])
    layout = Layout.classic(rng, np.asarray(shape, float) * np.asarray(spacing, float), z_range)
    draw_anatomy(canvas, layout, organ_ids(), _draw_table)
    image, label = _downsample(canvas, shape)
    image = _scanner_look(image, rng)
    return Phantom(image=image, label=label, affine=phantom_affine(shape, spacing), spacing=spacing,
                   label_names=card.label_map())


def organ_ids() -> dict[str, int]:
    """Label id of every organ of the `phantom` card, by name."""
    card = load_card(PHANTOM_CARD)
    return {name: card.resolve(name).label_id for name in card.names()}


def checked_seed(seed: int) -> None:
    """Refuse a seed that is not a non-negative integer."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(None, f"phantom seed {seed!r} is not a non-negative integer", "Pass seed=0, 1, 2, ...")


def _draw_table(canvas: Canvas, layout: Layout, body: BodyRegions) -> None:
    """The scanner table: a thin curved plate a few mm behind the patient's back."""
    plane = canvas.plane()
    x, y, _ = canvas.coords(plane)
    back = y[0, :, 0][body.body_plane.any(axis=(0, 2))].min()
    curve = back - layout.rng.uniform(4.0, 12.0) + (x - layout.shift[0]) ** 2 / 1200.0
    plate = (y < curve) & (y > curve - 5.0) & (np.abs(x - layout.shift[0]) < 190.0)
    canvas.paint(plane, plate, layout.hu(180, 20))
    canvas.extrude_first_plane()


def _downsample(canvas: Canvas, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Average HU over each voxel's in-plane samples (partial volume); label by majority of the samples."""
    X, Y, Z = shape
    f = _SUPERSAMPLE
    hu = canvas.hu.reshape(X, f, Y, f, Z).mean(axis=(1, 3), dtype=np.float32)
    blocks = canvas.label.reshape(X, f, Y, f, Z)
    counts = np.stack([(blocks == v).sum(axis=(1, 3)) for v in range(int(canvas.label.max()) + 1)])
    return hu, counts.argmax(axis=0).astype(np.uint8)


def _scanner_look(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Slight reconstruction blur plus correlated Gaussian noise (10-20 HU), clipped to the CT range."""
    image = gaussian_filter(image, sigma=(0.4, 0.4, 0.0))
    noise = gaussian_filter(rng.standard_normal(image.shape).astype(np.float32), sigma=(0.6, 0.6, 0.0))
    noise *= rng.uniform(10.0, 20.0) / max(float(noise.std()), 1e-6)
    return np.clip(image + noise, *HU_RANGE).astype(np.float32)


def _checked_grid(shape: tuple[int, int, int], spacing: tuple[float, float, float]
                  ) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    if len(shape) != 3 or any(int(s) < 8 for s in shape):
        raise InputError(None, f"phantom shape {tuple(shape)} is not 3 sizes of at least 8 voxels",
                         "Pass shape=(X, Y, Z), e.g. (128, 128, 32)")
    if len(spacing) != 3 or any(not np.isfinite(s) or s <= 0 for s in spacing):
        raise InputError(None, f"phantom spacing {tuple(spacing)} is not 3 positive sizes in mm",
                         "Pass spacing=(sx, sy, sz) in mm, e.g. (3.0, 3.0, 6.0)")
    return tuple(int(s) for s in shape), tuple(float(s) for s in spacing)
