"""Evaluate any model on labelled volumes through the predictor (the same code `medclipsam segment` runs): per
case and concept Dice/HD95/NSD, and seconds per volume. Settings: "text" (the organ names alone) and "manual" (each
organ's 3D box from the truth, the box a reader would draw around it)."""
from __future__ import annotations

import time
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from medclipsam.data.concepts import ConceptCard
from medclipsam.data.frame import voxel_spacing
from medclipsam.data.slices import load_case
from medclipsam.errors import InputError
from medclipsam.eval.metrics import evaluate_case
from medclipsam.inference.predictor import Predictor, Segmentation, SliceModel

SETTINGS = ("text", "manual")


def truth_boxes(label: Any, card: ConceptCard, concepts: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """Inclusive voxel box (x0, y0, z0, x1, y1, z1) of each concept present in an (X, Y, Z) or (1, X, Y, Z) label
    volume, in that volume's voxel order (RAS for `load_case`); concepts absent from it get no box."""
    volume = np.asarray(label)
    volume = volume[0] if volume.ndim == 4 else volume
    boxes = {}
    for concept in concepts:
        where = np.nonzero(volume == card.resolve(concept).label_id)
        if where[0].size:
            boxes[concept] = tuple(int(v) for v in (*(w.min() for w in where), *(w.max() for w in where)))
    return boxes


def card_labels(result: Segmentation, card: ConceptCard) -> np.ndarray:
    """The result's label map with each concept's value replaced by its label id in `card`."""
    return result.recoded({concept: card.resolve(concept).label_id for concept in result.concepts})


def segment_case(predictor: Predictor, case: Mapping[str, Any], card: ConceptCard, setting: str = "text"
                 ) -> np.ndarray:
    """A loaded case's label map (card label ids, RAS grid) by every concept of the card; "manual" prompts each
    concept present in the truth with its 3D box (absent concepts are not asked for)."""
    if setting not in SETTINGS:
        raise InputError(None, f"unknown setting {setting!r}", f"choose one of {SETTINGS}")
    predictor.set_volume(case["image"])
    names = card.names()
    if setting == "text":
        return card_labels(predictor.predict(names), card)
    if case.get("label") is None:
        raise InputError(case.get("image_path"), "the manual setting takes its boxes from the truth label, and this "
                         "case has none", "add the label to the datalist entry, or use the text setting")
    boxes = truth_boxes(case["label"], card, names)
    if not boxes:
        return np.zeros(np.asarray(case["label"]).shape[-3:], dtype=np.uint8)
    return card_labels(predictor.predict(list(boxes), boxes=boxes), card)


def evaluate_method(model: SliceModel, cases: Sequence[Mapping[str, Any]], card: ConceptCard,
                    setting: str = "text", batch_size: int | None = None, name: str | None = None) -> list[dict]:
    """Rows (one per case and concept) with the metrics, the method, the setting and seconds per volume; `cases`
    are datalist entries or already loaded cases (`load_case`)."""
    device = next(model.parameters(), torch.empty(0)).device if hasattr(model, "parameters") else "cpu"
    predictor = Predictor(model, device=device, batch_size=batch_size)
    method = name or getattr(model, "name", type(model).__name__)
    rows: list[dict] = []
    for entry in cases:
        case = entry if hasattr(entry.get("image"), "affine") else load_case(entry)
        start = time.perf_counter()
        predicted = segment_case(predictor, case, card, setting)
        seconds = time.perf_counter() - start
        spacing = tuple(float(s) for s in voxel_spacing(np.asarray(case["image"].affine)))
        for row in evaluate_case(predicted, np.asarray(case["label"]), spacing, card.label_map(),
                                 str(case["case_id"]), method=method):
            rows.append({**row, "setting": setting, "seconds_per_volume": round(seconds, 2)})
    return rows
