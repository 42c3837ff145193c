"""Which slices of a text-only organ mask are real: a logistic regression per organ over the mask's profile along z,
fitted for one model by `scripts/fit_slice_gate.py` on phantoms it never saw, stored beside its weights.

Why: the model segments each slice alone, with no context along z, and its probabilities are saturated on the slabs it
invents (a kidney on round bowel loops below its lower pole, a gallbladder in the pelvis), so no threshold removes
them. The mask's profile does: the area on a slice against the organ's peak, the model's confidence there, the areas
10 and 25 mm above and below, and how far the slice lies from the organ's centre in units of its own spread along z.
Only one concept's own profile is used, so asking for an organ alone or with others gives the same mask; a scan
shorter than `min_span_mm` along z has no profile to judge and is left as it is.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from medclipsam.errors import WeightsError
from medclipsam.models.bound_files import read_bound, write_bound

GATE_FILE = "slice_gate.json"
GATE_FORMAT = "medclipsam-slice-gate/1"
NEIGHBOURS_MM = (10.0, -10.0, 25.0, -25.0)
FEATURES = ("area", "confidence", "area_up_10mm", "area_down_10mm", "area_up_25mm", "area_down_25mm",
            "spread_offset", "spread_offset_abs", "spread_offset_squared")


def area_profiles(probabilities: torch.Tensor, threshold: float, pixel_mm: float) -> np.ndarray:
    """(Zf, K) area in cm2 of each concept's mask (probability above `threshold`) on each frame slice."""
    counts = (probabilities > threshold).flatten(2).sum(dim=2).double().numpy()
    return counts * pixel_mm * pixel_mm / 100.0


def _shifted(profile: np.ndarray, by: float) -> np.ndarray:
    """`profile` read `by` slices further (linear between slices, 0 beyond the scan)."""
    where = np.arange(len(profile)) + by
    low = np.floor(where).astype(np.int64)
    weight = where - low
    padded = np.concatenate([[0.0], profile, [0.0]])
    take = lambda i: padded[np.clip(i + 1, 0, len(padded) - 1)]  # noqa: E731
    return take(low) * (1.0 - weight) + take(low + 1) * weight


def slice_features(area: np.ndarray, confidence: np.ndarray, slice_mm: float) -> np.ndarray:
    """(Zf, len(FEATURES)) features of one concept's slices from its (Zf,) area profile (cm2) and confidence (NaN
    where none); slices run inferior to superior, `slice_mm` apart. Offsets from the organ's centre are in units of
    its own spread, not mm: gates fitted on phantoms with offsets in mm cut real organs longer than the phantoms'
    (the real CT's spleen 0.96 -> 0.69)."""
    area = np.asarray(area, dtype=np.float64)
    total, peak = area.sum(), area.max(initial=0.0)
    relative = area / peak if peak > 0 else np.zeros_like(area)
    z_mm = np.arange(len(area)) * slice_mm
    centre = float((z_mm * area).sum() / total) if total > 0 else 0.0
    spread = math.sqrt(float(((z_mm - centre) ** 2 * area).sum() / total)) if total > 0 else 0.0
    scaled = (z_mm - centre) / (spread + slice_mm / 2.0)
    neighbours = [_shifted(relative, mm / slice_mm) for mm in NEIGHBOURS_MM]
    return np.stack([relative, np.nan_to_num(np.asarray(confidence, dtype=np.float64)), *neighbours, scaled,
                     np.abs(scaled), scaled ** 2], axis=1)


@dataclass(frozen=True)
class OrganGate:
    """One organ's standardised logistic regression over FEATURES."""

    mean: np.ndarray
    scale: np.ndarray
    coefficients: np.ndarray
    intercept: float

    def probability(self, features: np.ndarray) -> np.ndarray:
        """(N,) probability that each slice's mask is the organ, from (N, len(FEATURES)) features."""
        logit = self.intercept + ((features - self.mean) / self.scale) @ self.coefficients
        return 1.0 / (1.0 + np.exp(-np.clip(logit, -50.0, 50.0)))

    @classmethod
    def fit(cls, features: np.ndarray, present: np.ndarray, weights: np.ndarray, strength: float = 1.0
            ) -> "OrganGate":
        """Fit on slices where the model found the organ: `present` where the reference has it there, each slice
        weighted by its mask area (a large invented slab costs more than a speck)."""
        from sklearn.linear_model import LogisticRegression  # only fitting needs scikit-learn

        mean, scale = features.mean(axis=0), features.std(axis=0) + 1e-6
        fitted = LogisticRegression(C=strength, max_iter=5000).fit((features - mean) / scale, present,
                                                                   sample_weight=weights / weights.mean())
        return cls(mean, scale, fitted.coef_[0].astype(np.float64), float(fitted.intercept_[0]))


@dataclass(frozen=True)
class SliceGate:
    """Per-organ gates, the probability below which a slice's mask is dropped, the shortest scan (mm along z) it
    judges, and how they were made."""

    organs: dict[str, OrganGate]
    threshold: float
    min_span_mm: float
    provenance: dict[str, Any]

    def keep(self, probabilities: torch.Tensor, confidence: torch.Tensor, concepts: Sequence[str],
             slice_mm: float, pixel_mm: float, mask_threshold: float) -> torch.Tensor:
        """(Zf, K) True where concept k's mask on slice z is kept (always for concepts without a gate, and on scans
        shorter than `min_span_mm`)."""
        area = area_profiles(probabilities, mask_threshold, pixel_mm)
        keep = torch.ones(area.shape, dtype=torch.bool)
        if (len(area) - 1) * slice_mm < self.min_span_mm:
            return keep
        for k, concept in enumerate(concepts):
            gate = self.organs.get(concept)
            if gate is None or not area[:, k].any():
                continue
            features = slice_features(area[:, k], confidence[:, k].double().numpy(), slice_mm)
            keep[:, k] = torch.from_numpy(gate.probability(features) >= self.threshold)
        return keep

    def apply(self, probabilities: torch.Tensor, confidence: torch.Tensor, concepts: Sequence[str],
              slice_mm: float, pixel_mm: float, mask_threshold: float) -> torch.Tensor:
        """`probabilities` (Zf, K, S, S) with the dropped slices' values of each concept set to 0, in place."""
        keep = self.keep(probabilities, confidence, concepts, slice_mm, pixel_mm, mask_threshold)
        probabilities[~keep] = 0.0
        return probabilities

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        organs = {name: {"mean": g.mean.tolist(), "scale": g.scale.tolist(), "coefficients": g.coefficients.tolist(),
                         "intercept": g.intercept} for name, g in self.organs.items()}
        return {"format": GATE_FORMAT, "features": list(FEATURES), "threshold": self.threshold,
                "min_span_mm": self.min_span_mm, "organs": organs, **self.provenance}

    def save(self, folder: str | Path) -> Path:
        """Write the gate into checkpoint `folder` (atomically), bound to the weights there."""
        return write_bound(folder, GATE_FILE, self.to_dict())


def _organ(raw: Mapping[str, Any]) -> OrganGate:
    arrays = [np.asarray(raw[key], dtype=np.float64) for key in ("mean", "scale", "coefficients")]
    if any(a.shape != (len(FEATURES),) for a in arrays) or not (arrays[1] > 0).all():
        raise ValueError("arrays of the wrong length or a non-positive scale")
    return OrganGate(*arrays, float(raw["intercept"]))


def load_slice_gate(folder: str | Path) -> SliceGate | None:
    """The gate stored in checkpoint `folder` (None when it has none); WeightsError when it is unreadable or was
    fitted for other weights."""
    fix = f"Re-run `python scripts/fit_slice_gate.py --model {folder}`, or delete {GATE_FILE} to segment without it"
    raw = read_bound(folder, GATE_FILE, GATE_FORMAT, fix)
    if raw is None:
        return None
    try:
        if raw.get("features") != list(FEATURES):
            raise ValueError("its features are not this version's")
        organs = {str(name): _organ(values) for name, values in raw["organs"].items()}
        threshold, min_span_mm = float(raw["threshold"]), float(raw["min_span_mm"])
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        raise WeightsError(Path(folder) / GATE_FILE, f"slice gate cannot be read ({error})", fix) from None
    provenance = {k: v for k, v in raw.items()
                  if k not in ("format", "features", "threshold", "min_span_mm", "organs", "weights_sha256")}
    return SliceGate(organs, threshold, min_span_mm, provenance)
