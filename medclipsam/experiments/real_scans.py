"""Real-scan checks: the real abdominal CT re-gridded as other scanners would have acquired it (a large field of view
at 0.8 mm with a table, or thick slices), and manual mode against the bare backbone it wraps (LiteMedSAM as users
run it: its untrained weights, the same box, the same slices), and the speed default against every slice."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from scipy import ndimage

from medclipsam.inference.predictor import Predictor
from medclipsam.models.factory import create_model

Box3D = tuple[int, int, int, int, int, int]


@dataclass
class Scan:
    """A volume in HU with its label map and RAS affine (voxel order RAS)."""

    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray


def regrid(scan: Scan, spacing: Sequence[float], shape: Sequence[int], offset_mm: Sequence[float] = (0.0, 0.0),
           table_hu: float | None = 200.0) -> Scan:
    """The scan resampled (linear; labels nearest) onto a grid of `shape` voxels of `spacing` mm centred on the
    scan's centre moved by `offset_mm`; outside it, air, and with `table_hu` a 15 mm table slab 10 mm below the
    body (a larger field of view shows the table the original crop left out)."""
    source_spacing = np.linalg.norm(scan.affine[:3, :3], axis=0)
    centre_mm = (np.asarray(scan.image.shape) - 1) / 2 * source_spacing
    start_mm = centre_mm - (np.asarray(shape) - 1) / 2 * np.asarray(spacing)
    start_mm[:2] -= np.asarray(offset_mm, dtype=float)
    axes = [(start_mm[d] + np.arange(shape[d]) * spacing[d]) / source_spacing[d] for d in range(3)]
    coords = np.stack(np.meshgrid(*axes, indexing="ij"))
    image = ndimage.map_coordinates(scan.image.astype(np.float32), coords, order=1, mode="constant", cval=-1024.0)
    label = ndimage.map_coordinates(scan.label, coords, order=0, mode="constant", cval=0)
    if table_hu is not None:
        body_y = np.nonzero((image > -500).any(axis=(0, 2)))[0]
        below = int(body_y.min() - round(10.0 / spacing[1]))
        image[:, max(0, below - int(round(15.0 / spacing[1]))):max(0, below), :] = table_hu
    affine = np.diag([*map(float, spacing), 1.0])
    affine[:3, 3] = scan.affine[:3, :3] @ (start_mm / source_spacing) + scan.affine[:3, 3]
    return Scan(image.astype(np.int16), label.astype(np.int16), affine)


def truth_boxes(label: np.ndarray, values: Mapping[str, int]) -> dict[str, Box3D]:
    """Each named structure's inclusive 3D voxel box in `label` (structures absent from it are left out)."""
    boxes = {}
    for name, value in values.items():
        where = np.nonzero(label == value)
        if where[0].size:
            boxes[name] = tuple(int(v) for v in (*(w.min() for w in where), *(w.max() for w in where)))
    return boxes


def manual_vs_backbone(predictor: Predictor, scan_path: Path, label: np.ndarray,
                       values: Mapping[str, int]) -> dict[str, tuple[float, float]]:
    """Per labelled structure, Dice of `predictor`'s model and of the bare backbone (the same model family
    untrained: LiteMedSAM as it ships), each given the structure's reference 3D box alone, on the same slices in the
    same view and encoder runtime."""
    boxes = truth_boxes(label, values)
    backbone = Predictor(create_model("clip_guided_sam", list(boxes)), device=predictor.device,
                         runtime=predictor.runtime)
    rows: dict[str, list[float]] = {name: [] for name in boxes}
    for model in (predictor, backbone):
        model.set_volume(scan_path)
        for name, box in boxes.items():
            rows[name].append(dice(model.predict([name], boxes={name: box}).mask(name), label == values[name]))
    return {name: (ours, bare) for name, (ours, bare) in rows.items()}


def fast_vs_every_slice(model_source: str, scan_path: Path, label: np.ndarray, values: Mapping[str, int],
                        device: str = "auto") -> dict[str, float]:
    """Mean Dice by name over `values`' structures with the model's working slice spacing and `segment`'s default
    encoder runtime ("fast": auto, OpenVINO on a CPU for 64+ slices) and with every slice on PyTorch (the reference),
    each structure's ("fast liver", ...), the agreement of the two, and the slices each one ran ("fast slices",
    "every slice slices")."""
    model = create_model(model_source)
    results, scores = {}, {}
    for name, spacing, runtime in (("fast", model.frame.slice_spacing_mm, "auto"), ("every slice", None, "torch")):
        model.frame = dataclasses.replace(model.frame, slice_spacing_mm=spacing)
        predictor = Predictor(model, device=device, runtime=runtime)
        predictor.set_volume(scan_path)
        scores[f"{name} slices"] = float(predictor.frame.slice_count)
        results[name] = predictor.predict(list(values))
        per_structure = {o: dice(results[name].mask(o), label == v) for o, v in values.items()}
        scores.update({f"{name} {o}": d for o, d in per_structure.items()})
        scores[name] = float(np.mean(list(per_structure.values())))
    scores["agreement"] = float(np.mean([dice(results["fast"].mask(o), results["every slice"].mask(o))
                                         for o in values]))
    return scores


def dice(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two boolean volumes (1 when both are empty)."""
    total = predicted.sum() + truth.sum()
    return 1.0 if total == 0 else float(2 * (predicted & truth).sum() / total)
