"""Working against a known truth: oracle 3D boxes of each organ (manual prompts for demos and evaluation) and a
`VolumeSegmentation` re-coded to the concept card's label ids, so it compares voxel for voxel with the label."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from medclipsam.data.concepts import ConceptCard
from medclipsam.errors import InputError
from medclipsam.inference.segment import VolumeSegmentation


def _volume(label: torch.Tensor | np.ndarray) -> np.ndarray:
    array = np.asarray(label.detach().cpu() if isinstance(label, torch.Tensor) else label)
    return array[0] if array.ndim == 4 else array


def label_boxes(label: torch.Tensor | np.ndarray | None, card: ConceptCard, concepts: Sequence[str]
                ) -> dict[str, tuple[int, int, int, int, int, int]]:
    """Inclusive voxel box (x0, y0, z0, x1, y1, z1) of each concept in an (X, Y, Z) or (1, X, Y, Z) label volume,
    in that volume's voxel order (RAS for `load_case` output); no label, or a concept absent from it, is an error."""
    if label is None:
        raise InputError(None, "there is no truth label to take the boxes from",
                         "Give a box per organ, a truth label volume, or a trained model (text-only mode)")
    volume = _volume(label)
    boxes = {}
    for concept in concepts:
        label_id = card.resolve(concept).label_id
        where = np.nonzero(volume == label_id)
        if not where[0].size:
            raise InputError(None, f"{concept!r} (label {label_id}) is not in this label volume",
                             "Prompt only organs the label contains, or give their boxes yourself")
        boxes[concept] = tuple(int(v) for v in (*(w.min() for w in where), *(w.max() for w in where)))
    return boxes


def card_labels(result: VolumeSegmentation, card: ConceptCard) -> np.ndarray:
    """The result's label map with each concept's value replaced by its label id in `card`."""
    labels = result.labels.numpy()
    recoded = np.zeros(labels.shape, dtype=np.uint8)
    for concept, value in result.label_values.items():
        recoded[labels == value] = card.resolve(concept).label_id
    return recoded
