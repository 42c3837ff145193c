"""Labelled volumes -> 2D items in the model's frame, for training every method.

A case is loaded in RAS with its raw intensities (`load_case`); its axial slices go through the frame the model
works in (`medclipsam.data.frame`: body-centred, fixed mm per pixel, optional working slice spacing) and the
model's intensity window, exactly as the predictor does at inference. Items are plain dicts of tensors, numbers,
strings and lists: "image" (3, S, S) in [0, 1], "masks" (K, S, S) one per concept listed, "concepts", "label_ids",
"present", "case_id", "slice_index" (the frame slice).
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch

from medclipsam.data.concepts import ConceptCard
from medclipsam.data.datalists import case_id_from_path
from medclipsam.data.frame import FrameSettings, VolumeFrame, fit_frame
from medclipsam.data.intensity import intensity_transform
from medclipsam.data.io import load_label, load_scan, to_ras
from medclipsam.errors import InputError


def load_case(item: Mapping[str, Any]) -> dict:
    """Load a datalist item's scan (and label, checked to lie on the scan's grid) in RAS with raw intensities ->
    {"image", "label" (if any), "case_id", "image_path", "label_path", the item's other keys}."""
    image_path = str(item["image"])
    case = {key: value for key, value in item.items() if key not in ("image", "label")}
    case["case_id"] = str(item.get("case_id") or case_id_from_path(image_path))
    case["image_path"] = image_path
    scan = load_scan(image_path)
    if item.get("label"):
        label_path = str(item["label"])
        label = load_label(label_path, like=scan)
        if not bool(label.as_tensor().any()):
            raise InputError(label_path, "empty label: it holds no foreground voxels (every value is 0)",
                             "Check the file, or remove this case from the datalist")
        case["label"] = to_ras(label)
        case["label_path"] = label_path
    case["image"] = to_ras(scan)
    return case


@dataclass
class FramedCase:
    """A loaded case in the model's frame: windowed slices in [0, 1], label slices (if labelled), the frame."""

    case_id: str
    images: torch.Tensor  # (Zf, 1, S, S)
    labels: torch.Tensor | None  # (Zf, S, S) label ids
    frame: VolumeFrame
    label_path: str | None = None


def frame_case(case: Mapping[str, Any], settings: FrameSettings) -> FramedCase:
    """A loaded case (`load_case`) through the frame and window of `settings`, labels by nearest neighbour."""
    frame = fit_frame(case["image"], settings)
    windowed = intensity_transform(settings.modality, settings.window)(case["image"])
    images = frame.slices(windowed, pad=0.0).clamp(0.0, 1.0)
    labels = None
    if case.get("label") is not None:
        label = torch.as_tensor(np.asarray(case["label"])).float()
        labels = frame.slices(label, nearest=True)[:, 0].round().long()
    return FramedCase(str(case["case_id"]), images, labels, frame, case.get("label_path"))


def _case_rng(seed: int, case_id: str) -> np.random.Generator:
    """Random generator fixed by the seed and the case id (so cases differ, runs repeat)."""
    return np.random.default_rng([int(seed), zlib.crc32(case_id.encode("utf-8"))])


def _check_label_values(label: torch.Tensor, card: ConceptCard, where: str) -> None:
    unknown = sorted(int(v) for v in torch.unique(label).tolist() if v != 0 and int(v) not in card.concepts)
    if unknown:
        raise InputError(
            where,
            f"label values {unknown} are not in concept card {card.name!r} (its label ids: {sorted(card.concepts)})",
            "Use the card that belongs to this dataset, or add those label ids to the card",
        )


def _selected_slices(labels: torch.Tensor, empty_ratio: float, slice_step: int, rng: np.random.Generator
                     ) -> list[int]:
    """Foreground slices (every `slice_step`-th) plus a seeded sample of empty slices, `empty_ratio` times as many."""
    if slice_step < 1:
        raise ValueError(f"slice_step must be a positive int, got {slice_step!r}")
    if not empty_ratio >= 0:
        raise ValueError(f"empty_ratio must be >= 0 (math.inf keeps every empty slice), got {empty_ratio!r}")
    has_foreground = labels.flatten(1).ne(0).any(dim=1)
    foreground = torch.nonzero(has_foreground).flatten().tolist()[::slice_step]
    empty = torch.nonzero(~has_foreground).flatten().tolist()
    wanted = len(empty) if math.isinf(empty_ratio) else math.floor(empty_ratio * len(foreground) + 0.5)
    chosen = rng.choice(empty, size=min(wanted, len(empty)), replace=False).tolist() if empty else []
    return sorted(foreground + [int(i) for i in chosen])


def slice_items(framed: FramedCase, card: ConceptCard, empty_ratio: float = 0.1, absent_per_slice: int = 1,
                seed: int = 0, slice_step: int = 1) -> list[dict]:
    """Training items of a framed labelled case: one per selected frame slice, with a binary mask per concept present
    and `absent_per_slice` sampled absent concepts (all-zero masks). Deterministic per seed."""
    if framed.labels is None:
        raise InputError(framed.case_id, "this datalist entry has no label, so it cannot give training slices",
                         "Add its \"label\" path to the datalist, or list it under another key")
    _check_label_values(framed.labels, card, framed.label_path or framed.case_id)
    rng = _case_rng(seed, framed.case_id)
    card_ids = sorted(card.concepts)
    items = []
    for index in _selected_slices(framed.labels, empty_ratio, slice_step, rng):
        plane = framed.labels[index]
        present_ids = [int(v) for v in torch.unique(plane).tolist() if v != 0]
        candidates = [i for i in card_ids if i not in present_ids]
        n_absent = min(max(absent_per_slice, 0), len(candidates))
        absent_ids = sorted(int(i) for i in rng.choice(candidates, size=n_absent, replace=False)) if n_absent else []
        masks = torch.zeros(len(present_ids) + n_absent, *plane.shape)
        if present_ids:
            masks[: len(present_ids)] = torch.stack([plane == i for i in present_ids]).float()
        label_ids = present_ids + absent_ids
        items.append({
            "image": framed.images[index].expand(3, -1, -1),
            "masks": masks,
            "concepts": [card.concepts[i].name for i in label_ids],
            "label_ids": label_ids,
            "present": [True] * len(present_ids) + [False] * n_absent,
            "case_id": framed.case_id,
            "slice_index": int(index),
        })
    return items


def unlabelled_items(framed: FramedCase, slice_step: int = 1) -> list[dict]:
    """Every `slice_step`-th frame slice of a framed case as an unlabelled item: "image", "case_id", "slice_index"."""
    return [{"image": framed.images[index].expand(3, -1, -1), "case_id": framed.case_id, "slice_index": index}
            for index in range(0, len(framed.images), slice_step)]


def view_plane(volume: Any, index: int) -> torch.Tensor:
    """Axial slice `index` of a (1, X, Y, Z) or (X, Y, Z) RAS volume as a radiologist views it: (Y, X) with anterior
    at the top and the patient's right on the image's left."""
    array = torch.as_tensor(np.asarray(volume))
    array = array[0] if array.ndim == 4 else array
    return array[:, :, index].flip((0, 1)).transpose(0, 1)
