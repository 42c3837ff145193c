"""Evidence that a predicted organ mask is a real organ, measured on the scan: the texture, attenuation and volume of
the mask against the organ's reference ranges, and whether the scan looks like a CT of a body at all.

The measurements feed the calibrated presence model (`medclipsam.inference.presence`) and the plausibility flags; the
calibration script computes them with these same functions, so training and use cannot drift apart.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from medclipsam.data.concepts import ReferenceRanges

AIR_HU = -500.0  # below: air (outside the body, lungs, bowel gas)
FAT_HU = (-190.0, -30.0)  # adipose tissue
BONE_HU = 300.0  # above: cortical and dense trabecular bone (or dense contrast)
NOISE_BAND_HU = (2.0, 80.0)  # local noise of real tissue in CT, from thin low-dose to thick smooth slices
_MAD_TO_SD = 1.4826
_RESIDUAL_GAIN = math.sqrt(1.25)  # SD of (voxel - mean of its 4 in-plane neighbours) over SD of white noise
_MAX_SAMPLES = 200_000
_SCAN_SAMPLES = 2_000_000
_CAP = 3.0  # log10 units: a feature this far from plausible is as absent as it gets
FEATURES = ("confidence", "texture_off", "hu_off", "volume_off", "scan_air", "scan_fat", "scan_bone")


@dataclass(frozen=True)
class ScanEvidence:
    """Scan-wide: the share of voxels that are air, and the shares of the rest that are fat and bone (a CT of an
    abdomen has air and fat and a few % bone; a blank volume or an MR in arbitrary units has no air or fat, a head CT
    little fat and a skull of about a fifth of the head)."""

    air_fraction: float
    fat_fraction: float
    bone_fraction: float


@dataclass(frozen=True)
class MaskEvidence:
    """One organ's mask: volume, whether a face of the volume cuts it, local noise and median intensity in its
    interior, and the share of the interior in the organ's HU range (NaN without a range)."""

    volume_ml: float
    truncated: bool
    noise_hu: float
    median_hu: float
    in_range: float


def scan_evidence(volume: np.ndarray) -> ScanEvidence:
    """Air, fat and bone fractions of an (X, Y, Z) volume in HU (strided when large: fractions need no full count)."""
    step = max(1, int(math.ceil((volume.size / _SCAN_SAMPLES) ** (1 / 3))))
    values = np.asarray(volume[::step, ::step, ::step], dtype=np.float32)
    air = values < AIR_HU
    rest = max(1, int((~air).sum()))
    fat = int(((values >= FAT_HU[0]) & (values <= FAT_HU[1])).sum())
    return ScanEvidence(float(air.mean()), fat / rest, int((values > BONE_HU).sum()) / rest)


def _interior(mask: np.ndarray) -> np.ndarray:
    """Mask voxels whose four in-plane neighbours are in the mask too (their residual is free of the border)."""
    inner = np.zeros_like(mask)
    core = mask[1:-1, 1:-1]
    inner[1:-1, 1:-1] = core & mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:]
    return inner


def _residual(volume: np.ndarray, where: np.ndarray) -> np.ndarray:
    """Voxel minus the mean of its four in-plane neighbours, at the voxels of `where` (none on the array's edge)."""
    x, y, z = np.nonzero(where)
    centre = volume[x, y, z].astype(np.float64)
    around = (volume[x - 1, y, z].astype(np.float64) + volume[x + 1, y, z] + volume[x, y - 1, z] + volume[x, y + 1, z])
    return centre - around / 4.0


def _sample(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`mask` thinned at random to at most _MAX_SAMPLES voxels (robust statistics need no more)."""
    count = int(mask.sum())
    if count <= _MAX_SAMPLES:
        return mask
    keep = np.zeros(count, dtype=bool)
    keep[rng.choice(count, _MAX_SAMPLES, replace=False)] = True
    thinned = np.zeros_like(mask)
    thinned[np.nonzero(mask)] = keep
    return thinned


def mask_evidence(mask: np.ndarray, volume: np.ndarray, voxel_ml: float,
                  hu_range: tuple[float, float] | None) -> MaskEvidence:
    """Measure a non-empty (X, Y, Z) boolean mask on its (X, Y, Z) volume (HU for CT) of the same grid."""
    truncated = bool(mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any()
                     or mask[:, :, 0].any() or mask[:, :, -1].any())
    spans = [np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
    box = tuple(slice(max(0, int(span[0]) - 1), int(span[-1]) + 2) for span in spans)  # with a 1-voxel margin
    local, image = mask[box], volume[box]
    inner = _interior(local)
    where = _sample(inner if inner.sum() >= 8 else local, np.random.default_rng(0))
    values = image[where].astype(np.float64)
    noise = float("nan")
    if inner.sum() >= 8:
        residual = _residual(image, where)
        noise = float(_MAD_TO_SD * np.median(np.abs(residual - np.median(residual))) / _RESIDUAL_GAIN)
    in_range = float("nan") if hu_range is None else float(np.mean((values >= hu_range[0]) & (values <= hu_range[1])))
    return MaskEvidence(float(mask.sum()) * voxel_ml, truncated, noise, float(np.median(values)), in_range)


def _log_outside(value: float, low: float, high: float) -> float:
    """How far `value` lies outside [low, high] in log10 units (0 inside), capped."""
    if not value > 0:
        return _CAP
    return float(min(_CAP, max(0.0, math.log10(low / value), math.log10(value / high))))


def features(confidence: float, evidence: MaskEvidence, scan: ScanEvidence,
             reference: ReferenceRanges | None) -> dict[str, float]:
    """The presence model's inputs (`FEATURES`): the model's confidence; how far the mask's texture, attenuation and
    volume lie outside what a real organ shows (0 inside; neutral 0 without a reference range or in a mask too thin
    to measure texture in; a cut organ's volume only against the range's upper end); how little air and fat the scan
    has (-log10 of their fractions) and its bone fraction."""
    texture = 0.0 if math.isnan(evidence.noise_hu) else _log_outside(evidence.noise_hu, *NOISE_BAND_HU)
    hu_off = 0.0 if math.isnan(evidence.in_range) else 1.0 - evidence.in_range
    volume_off = 0.0
    if reference is not None and reference.volume_ml is not None:
        low, high = reference.volume_ml
        low = min(low, evidence.volume_ml) if evidence.truncated else low
        volume_off = _log_outside(evidence.volume_ml, low, high)
    return {
        "confidence": 0.0 if math.isnan(confidence) else float(confidence),
        "texture_off": texture,
        "hu_off": hu_off,
        "volume_off": volume_off,
        "scan_air": -math.log10(scan.air_fraction + 1e-3),
        "scan_fat": -math.log10(scan.fat_fraction + 1e-3),
        "scan_bone": scan.bone_fraction,
    }


def flags(concept: str, evidence: MaskEvidence, reference: ReferenceRanges | None, ct: bool = True) -> list[str]:
    """Plausibility flags of a mask against the organ's adult reference ranges (volume; median HU on a CT)."""
    found: list[str] = []
    if reference is None:
        return found
    if reference.volume_ml is not None:
        low, high = reference.volume_ml
        if evidence.volume_ml > high:
            found.append(f"volume {evidence.volume_ml:.0f} mL is above the adult {concept} range {low:g}-{high:g} mL")
        elif evidence.volume_ml < low and not evidence.truncated:
            found.append(f"volume {evidence.volume_ml:.1f} mL is below the adult {concept} range {low:g}-{high:g} mL")
    if ct and reference.hu is not None:
        low, high = reference.hu
        if not low <= evidence.median_hu <= high:
            side = "below" if evidence.median_hu < low else "above"
            found.append(f"median attenuation {evidence.median_hu:.0f} HU is {side} the {concept} CT range "
                         f"{low:g} to {high:g} HU")
    return found
