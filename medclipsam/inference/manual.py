"""Manual prompts for scans: per-concept 3D boxes and points in the scan file's own voxel indices or in world mm
(RAS, as NIfTI and 3D Slicer show it; LPS, as DICOM and ITK-SNAP show it), placed on the RAS volume the model sees.

A box prompts every axial slice it crosses with its in-plane rectangle (`segment_volume`). A point prompts the
axial slice it lies on: a concept given points is segmented on those slices only.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from medclipsam.data.slices import label_plane, reassemble
from medclipsam.errors import InputError
from medclipsam.inference.cleanup import clean_mask
from medclipsam.inference.segment import segment_slice, segment_volume
from medclipsam.models.clip_guided_sam import CLIPGuidedSAM

COORDINATE_SPACES = ("voxel", "ras", "lps")
_LPS_TO_RAS = np.array([-1.0, -1.0, 1.0])
_SIZES = {"box": 6, "point": 3}
_FORMS = {"box": "ORGAN=X0,Y0,Z0,X1,Y1,Z1", "point": "ORGAN=X,Y,Z"}


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


def parse_manual_prompt(text: str, kind: str, prompts: Sequence[str]) -> ManualPrompt:
    """Parse 'ORGAN=numbers' (the organ may be left out when there is a single --prompt); a box is any two opposite
    corners, both inclusive."""
    word, _, numbers = text.rpartition("=")
    word = word.strip() or (prompts[0] if len(prompts) == 1 else "")
    fix = f"Write --{kind} {_FORMS[kind]!r}, e.g. --{kind} 'liver={','.join(['10'] * _SIZES[kind])}'"
    if not word:
        raise InputError(None, f"--{kind} {text!r} does not name its organ and there are several --prompt", fix)
    try:
        values = tuple(float(v) for v in numbers.split(","))
    except ValueError:
        raise InputError(None, f"--{kind} {text!r} holds a value that is not a number", fix) from None
    if len(values) != _SIZES[kind] or not all(np.isfinite(values)):
        raise InputError(None, f"--{kind} {text!r} needs {_SIZES[kind]} finite numbers, got {len(values)}", fix)
    return ManualPrompt(word, kind, values, text)


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
    where = f"RAS voxels {low.astype(int).tolist()}..{high.astype(int).tolist()}"
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
            if np.any(high < 0) or np.any(low > top):
                raise _outside(prompt, space, low, high, shape, scan)
            box = np.concatenate([np.clip(low, 0, top), np.clip(high, 0, top)]).astype(int)
            placed.boxes[concept] = tuple(int(v) for v in box)
        else:
            voxel = np.rint(to_ras_voxels(np.array(prompt.values), space, affine, ras_affine))[0]
            if np.any(voxel < 0) or np.any(voxel > top):
                raise _outside(prompt, space, voxel, voxel, shape, scan)
            placed.points.setdefault(concept, []).append(tuple(int(v) for v in voxel))
    return placed


def _segment_points(model: CLIPGuidedSAM, volume: torch.Tensor, concepts: Sequence[str],
                    points: Mapping[str, list[tuple[int, int, int]]], threshold: float,
                    progress: Callable[[int, int], None] | None) -> tuple[np.ndarray, dict[str, float]]:
    """Label map (values 1..K by position in `concepts`) of the axial slices holding points, and mean confidence."""
    shape = tuple(int(n) for n in volume.shape[1:])
    by_slice: dict[int, dict[int, list[tuple[int, int]]]] = {}
    for k, concept in enumerate(concepts):
        for x, y, z in points.get(concept, []):
            # axial slices are shown right-left and anterior-up: voxel (x, y) is pixel (X-1-x, Y-1-y)
            by_slice.setdefault(z, {}).setdefault(k, []).append((shape[0] - 1 - x, shape[1] - 1 - y))
    planes: dict[int, torch.Tensor] = {}
    scores: dict[int, list[float]] = {k: [] for k in range(len(concepts))}
    for done, (z, per_concept) in enumerate(sorted(by_slice.items()), start=1):
        order = sorted(per_concept)
        most = max(len(per_concept[k]) for k in order)
        coords = torch.zeros(len(order), most, 2)
        labels = torch.full((len(order), most), -1, dtype=torch.int64)  # -1: SAM's padding point
        for row, k in enumerate(order):
            coords[row, : len(per_concept[k])] = torch.tensor(per_concept[k], dtype=torch.float32)
            labels[row, : len(per_concept[k])] = 1
        result = segment_slice(model, label_plane(volume, 2, z), [concepts[k] for k in order], points=coords,
                               point_labels=labels, threshold=threshold)
        best, which = result.probabilities.max(dim=0)
        values = torch.tensor([k + 1 for k in order], dtype=torch.uint8)
        planes[z] = torch.where(best > threshold, values[which], torch.zeros_like(values[which]))
        for row, k in enumerate(order):
            if bool((planes[z] == k + 1).any()):
                scores[k].append(float(result.confidence[row]))
        if progress:
            progress(done, len(by_slice))
    labels_map = reassemble(planes, shape, axis=2).numpy() if planes else np.zeros(shape, dtype=np.uint8)
    confidence = {concepts[k]: float(np.mean(v)) if v else float("nan") for k, v in scores.items()}
    return labels_map, confidence


def segment_manual(model: CLIPGuidedSAM, volume: torch.Tensor, concepts: Sequence[str], prompts: ScanPrompts,
                   batch_size: int = 8, cleanup: bool = True, threshold: float = 0.5,
                   progress: Callable[[int, int], None] | None = None) -> tuple[np.ndarray, dict[str, float]]:
    """Manual mode on a (1, X, Y, Z) RAS [0, 1] volume: every concept has a box or points. Returns a label map
    (values 1..K in `concepts` order, RAS voxel order) and each concept's mean confidence (NaN if not found).

    Where a boxed and a pointed concept claim the same voxel, the boxed one keeps it. Clean-up of pointed concepts
    only fills holes (their slices need not touch, so isolated-slice and largest-component rules do not apply)."""
    concepts = list(concepts)
    missing = [c for c in concepts if c not in prompts.boxes and c not in prompts.points]
    if missing:
        raise InputError(None, f"manual mode needs a box or points for every concept; {missing} have none",
                         "give a --box or --point for every --prompt, or none at all for text-only mode")
    shape = tuple(int(n) for n in volume.shape[1:])
    labels = np.zeros(shape, dtype=np.uint8)
    confidence: dict[str, float] = {}
    boxed = [c for c in concepts if c in prompts.boxes]
    offset = 0
    if boxed:
        def box_progress(done: int, total: int) -> None:
            nonlocal offset
            offset = total
            if progress:
                progress(done, total)

        result = segment_volume(model, volume, boxed, boxes={c: prompts.boxes[c] for c in boxed},
                                batch_size=batch_size, threshold=threshold, progress=box_progress, cleanup=cleanup)
        found = result.labels.numpy()
        for concept in boxed:
            labels[found == result.label_values[concept]] = concepts.index(concept) + 1
            confidence[concept] = result.confidence[concept]
    pointed = [c for c in concepts if c not in prompts.boxes]
    if pointed:
        point_progress = None if progress is None else (lambda done, total: progress(offset + done, offset + total))
        found, point_confidence = _segment_points(model, volume, concepts, {c: prompts.points[c] for c in pointed},
                                                  threshold, point_progress)
        for concept in pointed:
            value = concepts.index(concept) + 1
            mask = found == value
            if cleanup:
                filled = clean_mask(mask, single_component=False, drop_isolated_slices=False)
                mask = filled & (mask | (found == 0))  # filled holes only take voxels no concept claimed
            labels[mask & (labels == 0)] = value
            confidence[concept] = point_confidence[concept]
    return labels, confidence
