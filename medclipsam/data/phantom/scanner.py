"""Scanner phantoms: the phantom's anatomy at its physical size, imaged with a realistic CT geometry (512 matrix,
sub-millimetre pixels, a field of view that may crop the body, table, arms, off-centre patient, contrast phase,
noise that grows as slices thin). One seed is one patient: its anatomy is the same at any geometry.

The volume is drawn in slabs of slices (memory stays bounded for thin-slice volumes); every slab replays the same
seeded draws, so slabs join seamlessly. Slices thicker than 1.5 mm average 2-3 samples along z (partial volume).
"""
from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter

from medclipsam.data.concepts import load_card
from medclipsam.errors import InputError

from .anatomy import draw_anatomy
from .canvas import HU_RANGE, Canvas
from .classic import PHANTOM_CARD, Phantom, checked_seed, organ_ids
from .geometry import SCAN_FOV_MM, ScannerGeometry, scanner_geometry
from .layout import Layout, phase_enhancement
from .surroundings import scanner_surroundings

ANATOMY_STREAM, CONTRAST_STREAM, NOISE_STREAM = 2, 4, 5  # SeedSequence streams of a seed (see also geometry, table)
_SLAB_SAMPLES = 8_000_000  # samples drawn at once: bounds the drawing's temporary arrays to about 0.5 GB
_BLUR_MM = 0.45  # reconstruction kernel blur (Gaussian sigma, in-plane)
_NOISE_GRAIN_MM = 0.6  # noise correlation length (Gaussian sigma of the filtered white noise, in-plane)


def make_scanner_phantom(seed: int, geometry: ScannerGeometry | None = None) -> Phantom:
    """Case `seed`'s abdomen imaged with `geometry` (None: a realistic geometry drawn from the seed).

    Labels are the `phantom` card's organs; table and arms are unlabelled. The affine is the scanner's: real
    pixel spacing, isocentre in the middle of each slice (the patient sits `geometry.offset_mm` from it).
    """
    checked_seed(seed)
    if geometry is None:
        geometry = scanner_geometry(seed)
    elif not isinstance(geometry, ScannerGeometry):
        raise InputError(None, f"geometry {geometry!r} is not a ScannerGeometry",
                         "Pass geometry=ScannerGeometry(...), scanner_geometry(seed) or None")
    affine = geometry.affine()
    shape = geometry.shape
    axes = [affine[d, 3] + np.arange(shape[d]) * affine[d, d] for d in range(3)]
    sub = _z_samples(geometry.slice_mm)
    offsets = ((np.arange(sub) + 0.5) / sub - 0.5) * geometry.slice_mm
    bolus = np.random.default_rng((int(seed), CONTRAST_STREAM)).uniform(0.8, 1.2)
    enhancement = phase_enhancement(geometry.phase, bolus)
    surroundings = scanner_surroundings(seed, geometry)
    ids = organ_ids()
    noise_rng = np.random.default_rng((int(seed), NOISE_STREAM))
    scanned = _scan_circle(axes[0], axes[1])
    image = np.empty(shape, np.float32)
    label = np.empty(shape, np.uint8)
    per_slab = max(1, _SLAB_SAMPLES // (shape[0] * shape[1] * sub))
    for start in range(0, shape[2], per_slab):
        stop = min(shape[2], start + per_slab)
        canvas = Canvas([axes[0], axes[1], (axes[2][start:stop, None] + offsets[None, :]).ravel()])
        layout = Layout.physical(np.random.default_rng((int(seed), ANATOMY_STREAM)), geometry.offset_mm, enhancement)
        draw_anatomy(canvas, layout, ids, surroundings)
        hu, label_slab = _slices(canvas, sub)
        label[..., start:stop] = label_slab
        image[..., start:stop] = np.where(scanned, _reconstruct(hu, geometry, noise_rng), HU_RANGE[0])
    return Phantom(image=image, label=label, affine=affine, spacing=geometry.spacing,
                   label_names=load_card(PHANTOM_CARD).label_map(), geometry=geometry)


def _z_samples(slice_mm: float) -> int:
    """Samples drawn per slice along z: thick slices average several (partial volume), thin ones need one."""
    return int(min(3, max(1, round(slice_mm / 1.5))))


def _slices(canvas: Canvas, sub: int) -> tuple[np.ndarray, np.ndarray]:
    """Average each slice's `sub` z samples (HU) and take the label most of them carry (ties: the lowest id)."""
    if sub == 1:
        return canvas.hu, canvas.label
    X, Y, Zs = canvas.hu.shape
    hu = canvas.hu.reshape(X, Y, Zs // sub, sub).mean(axis=3, dtype=np.float32)
    samples = np.moveaxis(canvas.label.reshape(X, Y, Zs // sub, sub), 3, 0)
    votes = sum((samples == other).astype(np.int16) for other in samples)
    best = np.argmax(votes * 256 + (255 - samples.astype(np.int16)), axis=0)
    return hu, np.take_along_axis(samples, best[None], axis=0)[0]


def _reconstruct(hu: np.ndarray, geometry: ScannerGeometry, rng: np.random.Generator) -> np.ndarray:
    """Kernel blur plus in-plane correlated Gaussian noise of `geometry.noise_hu` HU, clipped to the CT range."""
    blur = _BLUR_MM / geometry.pixel_mm
    grain = _NOISE_GRAIN_MM / geometry.pixel_mm
    image = gaussian_filter(hu, sigma=(blur, blur, 0.0))
    noise = gaussian_filter(rng.standard_normal(hu.shape, dtype=np.float32), sigma=(grain, grain, 0.0))
    noise *= geometry.noise_hu / _filtered_noise_sd(grain)
    return np.clip(image + noise, *HU_RANGE)


def _filtered_noise_sd(sigma: float) -> float:
    """Standard deviation of unit white noise after the in-plane Gaussian filter of `sigma` pixels."""
    size = 2 * int(np.ceil(4 * sigma)) + 1
    impulse = np.zeros((size, size), np.float64)
    impulse[size // 2, size // 2] = 1.0
    return float(np.sqrt((gaussian_filter(impulse, sigma) ** 2).sum()))


def _scan_circle(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """In-plane mask (X, Y, 1) of pixels inside the scanned circle; the rest of a large display field is padding."""
    return ((x[:, None] ** 2 + y[None, :] ** 2) <= (SCAN_FOV_MM / 2) ** 2)[:, :, None]
