"""`--box` and `--point` arguments: parsed with a message naming the value at fault, then placed on a scan as voxel
indices of the RAS volume the model sees. Coordinates are the scan file's own voxel indices or world mm (RAS, as
NIfTI and 3D Slicer show it; LPS, as DICOM and ITK-SNAP show it)."""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from medclipsam.errors import InputError

COORDINATE_SPACES = ("voxel", "ras", "lps")
MAX_COORDINATE = 1e6  # voxels or mm: no scan is a kilometre across, and larger values overflow voxel indices
_LPS_TO_RAS = np.array([-1.0, -1.0, 1.0])
_SIZES = {"box": 6, "point": 3}
_FORMS = {"box": "ORGAN=X0,Y0,Z0,X1,Y1,Z1", "point": "ORGAN=X,Y,Z"}
_EXAMPLES = {"box": "liver=10,20,5,60,80,25", "point": "liver=40,50,12"}


@dataclass(frozen=True)
class ManualPrompt:
    """One --box or --point argument: the organ word it names, its kind and its numbers as given."""

    word: str
    kind: str  # "box" or "point"
    values: tuple[float, ...]
    text: str


@dataclass
class ScanPrompts:
    """Manual prompts of one scan on its RAS volume: concept -> inclusive voxel box, concept -> voxel points."""

    boxes: dict[str, tuple[int, int, int, int, int, int]] = field(default_factory=dict)
    points: dict[str, list[tuple[int, int, int]]] = field(default_factory=dict)


def _value_problem(text: str) -> str | None:
    """Why `text` cannot be a coordinate, or None when it can."""
    try:
        value = float(text)
    except ValueError:
        return "is not a number"
    if math.isnan(value):
        return "is not a number (NaN)"
    if math.isinf(value):
        return "is infinite"
    if abs(value) > MAX_COORDINATE:
        return "is too large"
    return None


def parse_manual_prompt(text: str, kind: str, prompts: Sequence[str]) -> ManualPrompt:
    """Parse 'ORGAN=numbers' (the organ may be left out when there is a single --prompt); a box is any two opposite
    corners, both inclusive. Each value that is wrong is named in the error."""
    word, _, numbers = text.rpartition("=")
    word = word.strip() or (prompts[0] if len(prompts) == 1 else "")
    fix = f"Write --{kind} {_FORMS[kind]!r}, e.g. --{kind} {_EXAMPLES[kind]!r}"
    if not word:
        raise InputError(None, f"--{kind} {text!r} does not name its organ and there are several --prompt", fix)
    parts = [part.strip() for part in numbers.split(",")]
    if len(parts) != _SIZES[kind]:
        raise InputError(None, f"--{kind} {text!r} needs {_SIZES[kind]} numbers ({_FORMS[kind].partition('=')[2]}), "
                         f"got {len(parts)}", fix)
    problems = [f"value {i} {part!r} {problem}" for i, part in enumerate(parts, start=1)
                if (problem := _value_problem(part)) is not None]
    if problems:
        raise InputError(None, f"--{kind} {text!r}: {', '.join(problems)} (coordinates are finite numbers within "
                         f"±{MAX_COORDINATE:,.0f}, voxel indices or mm)", fix)
    return ManualPrompt(word, kind, tuple(float(part) for part in parts), text)


def to_ras_voxels(coords: np.ndarray, space: str, affine: np.ndarray, ras_affine: np.ndarray) -> np.ndarray:
    """(N, 3) coordinates in `space` ("voxel": the file's own indices with `affine`; "ras"/"lps": world mm) →
    fractional voxel coordinates of the RAS volume whose affine is `ras_affine`."""
    if space not in COORDINATE_SPACES:
        raise InputError(None, f"unknown coordinate space {space!r}", f"Use one of: {', '.join(COORDINATE_SPACES)}")
    coords = np.atleast_2d(np.asarray(coords, dtype=np.float64))
    if space == "voxel":
        world = coords @ np.asarray(affine, dtype=np.float64)[:3, :3].T + np.asarray(affine)[:3, 3]
    else:
        world = coords * _LPS_TO_RAS if space == "lps" else coords
    inverse = np.linalg.inv(np.asarray(ras_affine, dtype=np.float64))
    return world @ inverse[:3, :3].T + inverse[:3, 3]


def _outside(prompt: ManualPrompt, space: str, low: np.ndarray, high: np.ndarray, shape: Sequence[int],
             scan: str | Path) -> InputError:
    def listed(voxel: np.ndarray) -> str:
        return "[" + ", ".join(f"{v:.6g}" for v in voxel) + "]"

    where = f"RAS voxels {listed(low)}..{listed(high)}"
    return InputError(scan, f"--{prompt.kind} {prompt.text!r} ({space} coordinates) lies outside the scan "
                      f"({where}, the volume is {list(shape)})",
                      "Give it in this scan's coordinates: voxel indices of the file (--coords voxel) or world mm "
                      "(--coords ras or lps)")


def place_prompts(prompts: Sequence[ManualPrompt], concept_of: Mapping[str, str], space: str, affine: np.ndarray,
                  ras_affine: np.ndarray, shape: Sequence[int], scan: str | Path) -> ScanPrompts:
    """Boxes and points of one scan as RAS-volume voxel indices (boxes clipped to the volume); `concept_of` maps
    each prompt's word to its concept; a prompt wholly outside the volume is an error naming the scan."""
    placed = ScanPrompts()
    top = np.asarray(shape, dtype=np.float64) - 1
    for prompt in prompts:
        concept = concept_of[prompt.word]
        if prompt.kind == "box":
            corners = np.array(list(itertools.product(*zip(prompt.values[:3], prompt.values[3:]))))
            voxels = np.rint(to_ras_voxels(corners, space, affine, ras_affine))
            low, high = voxels.min(axis=0), voxels.max(axis=0)
            if not np.all(np.isfinite(voxels)) or np.any(high < 0) or np.any(low > top):
                raise _outside(prompt, space, low, high, shape, scan)
            box = np.concatenate([np.clip(low, 0, top), np.clip(high, 0, top)]).astype(int)
            placed.boxes[concept] = tuple(int(v) for v in box)
        else:
            voxel = np.rint(to_ras_voxels(np.array(prompt.values), space, affine, ras_affine))[0]
            if not np.all(np.isfinite(voxel)) or np.any(voxel < 0) or np.any(voxel > top):
                raise _outside(prompt, space, voxel, voxel, shape, scan)
            placed.points.setdefault(concept, []).append(tuple(int(v) for v in voxel))
    return placed
