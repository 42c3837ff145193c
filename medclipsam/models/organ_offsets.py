"""Each organ's decision threshold for text-only masks, as an offset added to its logits: fitted for one model by
`scripts/fit_organ_offsets.py` on phantoms it never saw (after the slice gate, which comes first), stored beside its
weights.

Why: one threshold (0.5) for every organ is not where each organ's Dice is best; the offsets fitted for the shipped
model are positive for eight of its nine organs (thresholds 0.38 down to 0.12: it is conservative). A positive offset
lowers that organ's threshold and lets it win more voxels against its neighbours. Boxes and clicks are not offset.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from medclipsam.errors import WeightsError
from medclipsam.models.bound_files import read_bound, write_bound

OFFSETS_FILE = "organ_offsets.json"
OFFSETS_FORMAT = "medclipsam-organ-offsets/1"
_EPSILON = 1e-6


@dataclass(frozen=True)
class OrganOffsets:
    """Logit offset per organ name (organs not named keep 0), and how they were made."""

    offsets: dict[str, float]
    provenance: dict[str, Any]

    def apply(self, probabilities: torch.Tensor, concepts: Sequence[str]) -> torch.Tensor:
        """`probabilities` (Zf, K, S, S) with concept k's moved to sigmoid(logit(p) + offset), in place; exact zeros
        (outside the frame, slices the gate dropped) stay zero."""
        for k, concept in enumerate(concepts):
            offset = self.offsets.get(concept, 0.0)
            if offset:
                values = probabilities[:, k]
                shifted = torch.sigmoid(torch.logit(values.float(), eps=_EPSILON) + offset)
                values.copy_(torch.where(values > 0, shifted, torch.zeros_like(shifted)))
        return probabilities

    def save(self, folder: str | Path) -> Path:
        """Write the offsets into checkpoint `folder` (atomically), bound to the weights there."""
        return write_bound(folder, OFFSETS_FILE, {"format": OFFSETS_FORMAT, "offsets": self.offsets,
                                                  **self.provenance})


def _offsets(raw: Mapping[str, Any]) -> dict[str, float]:
    offsets = {str(name): float(value) for name, value in raw.items()}
    if not all(math.isfinite(value) for value in offsets.values()):
        raise ValueError("an offset is not a finite number")
    return offsets


def load_organ_offsets(folder: str | Path) -> OrganOffsets | None:
    """The offsets stored in checkpoint `folder` (None when it has none); WeightsError when they are unreadable or
    were fitted for other weights."""
    fix = (f"Re-run `python scripts/fit_organ_offsets.py --model {folder}`, or delete {OFFSETS_FILE} to segment "
           "without them")
    raw = read_bound(folder, OFFSETS_FILE, OFFSETS_FORMAT, fix)
    if raw is None:
        return None
    try:
        offsets = _offsets(raw["offsets"])
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        raise WeightsError(Path(folder) / OFFSETS_FILE, f"organ offsets cannot be read ({error})", fix) from None
    provenance = {k: v for k, v in raw.items() if k not in ("format", "offsets", "weights_sha256")}
    return OrganOffsets(offsets, provenance)
