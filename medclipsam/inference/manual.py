"""Manual mode on a scan: per-concept 3D boxes and points, already placed on the RAS volume the model sees
(`prompt_args.place_prompts`).

A box prompts every axial slice it crosses with its in-plane rectangle (`segment_volume`). A point prompts the
axial slice it lies on: a concept given points is segmented on those slices only.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from medclipsam.data.slices import label_plane, reassemble
from medclipsam.errors import InputError
from medclipsam.inference.cleanup import clean_mask
from medclipsam.inference.prompt_args import ScanPrompts
from medclipsam.inference.segment import segment_slice, segment_volume
from medclipsam.models.clip_guided_sam import CLIPGuidedSAM


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
