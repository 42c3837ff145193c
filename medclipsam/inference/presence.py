"""Is each segmented organ really there? A presence probability per organ from a logistic regression over evidence
measured on the mask and the scan (`presence_features`), calibrated by `scripts/calibrate_presence.py` on present
and absent organs, blank and noise volumes and scans of other body regions; below the calibrated threshold the organ
is reported absent with the reason. Plausibility flags compare each mask with the organ's reference ranges.

Why: the model's own confidence does not tell found from invented (a blank 40 HU volume gets a liver at 0.70, a real
liver 0.69); with the mask's texture, attenuation and volume and the scan's air, fat and bone it does much better.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Collection, Mapping

import numpy as np
from monai.data import MetaTensor

from medclipsam.data.concepts import ConceptCard, ReferenceRanges, load_card
from medclipsam.data.io import to_ras
from medclipsam.errors import InputError, UnknownConceptError
from medclipsam.inference.predictor import Segmentation
from medclipsam.inference.presence_features import (
    BONE_HU, FAT_HU, FEATURES, NOISE_BAND_HU, MaskEvidence, ScanEvidence, features, flags, mask_evidence, scan_evidence,
)

CALIBRATION_FORMAT = "medclipsam-presence/1"
CALIBRATION_FILE = "presence_calibration.json"
PRESENCE_COLUMNS = ("presence", "present", "reason", "flags")
_REASONS_SHOWN = 2


@dataclass(frozen=True)
class Presence:
    """One organ's verdict: calibrated probability that the mask is a real organ (NaN when not assessed), whether it
    is reported present, why not (empty when present) and plausibility flags."""

    probability: float
    present: bool
    reason: str
    flags: tuple[str, ...] = ()


@dataclass(frozen=True)
class Measurement:
    """What the presence model sees of one organ: the model's confidence, the mask's evidence and the features made of
    it (None when the mask is empty), and the scan's evidence."""

    confidence: float
    mask: MaskEvidence | None
    scan: ScanEvidence
    features: dict[str, float] | None


@dataclass(frozen=True)
class PresenceModel:
    """A calibrated logistic regression over `FEATURES` (standardised), its threshold and its provenance."""

    mean: np.ndarray
    scale: np.ndarray
    coefficients: np.ndarray
    intercept: float
    threshold: float
    provenance: dict[str, Any]

    def contributions(self, values: Mapping[str, float]) -> np.ndarray:
        """Each feature's term of the log-odds (negative: speaks for absent)."""
        x = np.array([values[name] for name in FEATURES], dtype=np.float64)
        return self.coefficients * (x - self.mean) / self.scale

    def probability(self, values: Mapping[str, float]) -> float:
        """Calibrated probability that the organ is present."""
        logit = self.intercept + float(self.contributions(values).sum())
        return 1.0 / (1.0 + math.exp(-logit)) if logit >= 0 else math.exp(logit) / (1.0 + math.exp(logit))

    def is_for(self, folder: str | Path) -> bool:
        """True when this calibration was made for the model in checkpoint `folder` (same files, byte for byte)."""
        return (self.provenance.get("model") or {}).get("folder_sha256") == model_fingerprint(folder)


def model_fingerprint(folder: str | Path) -> str:
    """SHA-256 over a checkpoint folder's files (names and bytes): which model a calibration belongs to."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(folder).iterdir() if p.is_file()):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def calibration_path() -> Path:
    """The calibration shipped with the package."""
    return Path(str(resources.files("medclipsam") / "assets" / CALIBRATION_FILE))


def load_presence_model(path: str | Path | None = None) -> PresenceModel:
    """Read a calibration written by scripts/calibrate_presence.py (default: the shipped one)."""
    path = Path(path) if path is not None else calibration_path()
    fix = "Re-run `python scripts/calibrate_presence.py` to write it"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise InputError(path, f"presence calibration cannot be read ({error.__class__.__name__}: {error})", fix) \
            from None
    if not isinstance(raw, dict) or raw.get("format") != CALIBRATION_FORMAT:
        raise InputError(path, f"not a presence calibration of format {CALIBRATION_FORMAT}", fix)
    if raw.get("features") != list(FEATURES):
        raise InputError(path, f"calibrated on features {raw.get('features')}, this version measures "
                         f"{list(FEATURES)}", fix)
    try:
        arrays = [np.asarray(raw[key], dtype=np.float64) for key in ("mean", "scale", "coefficients")]
        model = PresenceModel(*arrays, float(raw["intercept"]), float(raw["threshold"]),
                              {k: raw.get(k) for k in ("model", "data", "date", "separation")})
    except (KeyError, TypeError, ValueError) as error:
        raise InputError(path, f"presence calibration is incomplete or malformed ({error})", fix) from None
    if any(a.shape != (len(FEATURES),) for a in arrays) or not (arrays[1] > 0).all():
        raise InputError(path, "presence calibration has arrays of the wrong length or a non-positive scale", fix)
    return model


def _intensities(result: Segmentation, scan: MetaTensor | None) -> np.ndarray:
    """The scan on the segmentation's RAS grid as an (X, Y, Z) float32 array."""
    volume = to_ras(scan if scan is not None else result.scan)
    array = np.asarray(volume.detach().cpu().numpy(), dtype=np.float32)
    array = array[0] if array.ndim == 4 else array
    if array.shape != result.labels.shape:
        raise InputError(None, f"scan grid {array.shape} differs from the segmentation's {result.labels.shape}",
                         "assess a segmentation with the scan it was made from")
    return array


def _reference(card: ConceptCard, concept: str) -> ReferenceRanges | None:
    """The concept's reference ranges in `card` (None when the card does not name it or gives none)."""
    try:
        return card.resolve(concept).reference
    except UnknownConceptError:
        return None


def measure(result: Segmentation, card: ConceptCard | str, scan: MetaTensor | None = None
            ) -> dict[str, Measurement]:
    """Per concept of `result`, the evidence the presence model uses (`scan`: the scan segmented, default
    `result.scan`); concepts are looked up in `card` for their reference ranges."""
    card = load_card(card) if isinstance(card, str) else card
    volume = _intensities(result, scan)
    whole = scan_evidence(volume)
    voxel_ml = abs(float(np.linalg.det(np.asarray(result.affine, dtype=np.float64)[:3, :3]))) / 1000.0  # mm3 -> mL
    found: dict[str, Measurement] = {}
    for concept in result.concepts:
        reference = _reference(card, concept)
        confidence = float(result.confidence.get(concept, float("nan")))
        mask = result.mask(concept)
        if not mask.any():
            found[concept] = Measurement(confidence, None, whole, None)
            continue
        hu_range = reference.hu if reference is not None else None
        evidence = mask_evidence(mask, volume, voxel_ml, hu_range)
        found[concept] = Measurement(confidence, evidence, whole, features(confidence, evidence, whole, reference))
    return found


def _why(name: str, concept: str, item: Measurement, reference: ReferenceRanges | None) -> str | None:
    """A feature's evidence against presence, in words (None for a range the card does not give)."""
    evidence, scan = item.mask, item.scan
    hu = reference.hu if reference is not None else None
    volume_range = reference.volume_ml if reference is not None else None
    if name == "confidence":
        return f"the model's confidence is low ({item.confidence:.2f})"
    if name == "texture_off":
        if not evidence.noise_hu >= NOISE_BAND_HU[0]:
            return (f"the mask has no tissue texture (local noise {evidence.noise_hu:.1f} HU; real tissue "
                    f"{NOISE_BAND_HU[0]:g}-{NOISE_BAND_HU[1]:g} HU)")
        return f"the mask is noise, not tissue (local noise {evidence.noise_hu:.0f} HU)"
    if name == "hu_off":
        return None if hu is None else \
            f"only {evidence.in_range:.0%} of the mask lies in the {concept} CT range {hu[0]:g} to {hu[1]:g} HU"
    if name == "volume_off":
        if volume_range is None:
            return None
        side = "below" if evidence.volume_ml < volume_range[0] else "above"
        return (f"volume {evidence.volume_ml:.0f} mL is {side} the adult {concept} range "
                f"{volume_range[0]:g}-{volume_range[1]:g} mL")
    if name == "scan_air":
        return f"the scan has almost no air ({scan.air_fraction:.1%} of voxels), unlike a CT of a body"
    if name == "scan_fat":
        return (f"the scan has almost no fat ({scan.fat_fraction:.1%} of the non-air voxels at "
                f"{FAT_HU[0]:g} to {FAT_HU[1]:g} HU), unlike an abdominal CT")
    return (f"the scan is {scan.bone_fraction:.0%} bone (above {BONE_HU:g} HU; an abdomen has a few %), as a skull "
            "or noise is")


def _verdict(model: PresenceModel | None, concept: str, item: Measurement, card: ConceptCard, ct: bool) -> Presence:
    """Presence of one measured organ (not judged without a model, i.e. not CT or placed by the user)."""
    if item.mask is None:
        return Presence(0.0, False, "not found: the model marked no voxel of it")
    reference = _reference(card, concept)
    organ_flags = tuple(flags(concept, item.mask, reference, ct=ct))
    if model is None:
        return Presence(float("nan"), True, "", organ_flags)
    probability = model.probability(item.features)
    if probability >= model.threshold:
        return Presence(probability, True, "", organ_flags)
    terms = model.contributions(item.features)
    said = [_why(FEATURES[i], concept, item, reference) for i in np.argsort(terms) if terms[i] < 0]
    words = "; ".join([text for text in said if text][:_REASONS_SHOWN])
    reason = f"presence {probability:.3f} is below {model.threshold:.3f}" + (f": {words}" if words else "")
    return Presence(probability, False, reason, organ_flags)


def assess(result: Segmentation, card: ConceptCard | str, scan: MetaTensor | None = None,
           model: PresenceModel | None = None, modality: str = "CT", placed: Collection[str] = ()
           ) -> dict[str, Presence]:
    """Presence of every concept of `result` (`card`: the card its names come from; `model`: default the shipped
    calibration). Only text-only CT results are judged: for another modality, or a concept the user `placed` by box
    or click, nothing is called absent (probability NaN) and only the flags are given."""
    card = load_card(card) if isinstance(card, str) else card
    ct = modality.upper() == "CT"
    model = (model or load_presence_model()) if ct else None
    return {concept: _verdict(None if concept in placed else model, concept, item, card, ct)
            for concept, item in measure(result, card, scan).items()}


def presence_columns(verdicts: Mapping[str, Presence]) -> dict[str, dict[str, Any]]:
    """Report columns per concept: presence (3 decimals, None when not assessed), present, reason, flags ("; ")."""
    return {concept: {"presence": None if math.isnan(v.probability) else round(v.probability, 3),
                      "present": v.present, "reason": v.reason, "flags": "; ".join(v.flags)}
            for concept, v in verdicts.items()}


def without_absent(result: Segmentation, verdicts: Mapping[str, Presence]) -> Segmentation:
    """`result` with the organs reported absent removed from its label map (their confidence becomes NaN)."""
    labels = result.labels.copy()
    confidence = dict(result.confidence)
    for value, concept in enumerate(result.concepts, start=1):
        if not verdicts[concept].present:
            labels[labels == value] = 0
            confidence[concept] = float("nan")
    return Segmentation(labels, list(result.concepts), confidence, result.affine, result.scan)
