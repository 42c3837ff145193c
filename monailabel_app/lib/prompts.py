"""What a MONAI Label infer request asks of medclipsam: organs to segment by name, and clicks or a box that refine
one organ. Coordinates are voxel indices (i, j, k) of the image as the client loaded it (3D Slicer's IJK), as in MONAI
Label's DeepEdit and Deepgrow requests; they are placed on the predictor's RAS volume here."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from medclipsam.data.concepts import ConceptCard
from medclipsam.errors import InputError, UnknownConceptError
from medclipsam.inference.prompt_args import to_ras_voxels

BACKGROUND = "background"  # DeepEdit's name for negative clicks
_EXAMPLE = '{"organs": ["liver", "spleen"]} or {"liver": [[40, 31, 4]], "background": [[10, 12, 4]]}'


@dataclass
class Refinement:
    """The prompts of one organ, in the client's voxel indices: a box (x0, y0, z0, x1, y1, z1) and/or clicks
    (x, y, z, label: 1 on the organ, 0 off it)."""

    organ: str
    box: tuple[float, ...] | None = None
    points: list[tuple[float, float, float, int]] = field(default_factory=list)


@dataclass(frozen=True)
class InferRequest:
    """Organs to segment by name (card names, request order), the organs to refine with their prompts, and whether
    the request edits the last result (then an edit without usable prompts changes nothing)."""

    organs: list[str]
    refinements: list[Refinement]
    edit: bool = False


def _organ(word: Any, card: ConceptCard, labels: Sequence[str], what: str) -> str:
    """The card's name for `word`, which must be one of the app's labels."""
    try:
        name = card.resolve(str(word)).name
    except UnknownConceptError as error:
        close = f" (close: {', '.join(repr(c) for c in error.close)})" if error.close else ""
        raise InputError(None, f"{what} {word!r} names no organ of card {card.name!r}{close}",
                         f"Use one of the model's labels: {', '.join(labels)}") from None
    if name not in labels:
        raise InputError(None, f"{what} {word!r} is not one of this model's labels",
                         f"Use one of: {', '.join(labels)}")
    return name


def _numbers(value: Any, count: int, what: str) -> tuple[float, ...]:
    """`count` finite numbers from a JSON list, or an error naming `what`."""
    fix = f"Give {count} voxel indices, e.g. {_EXAMPLE}"
    if not isinstance(value, (list, tuple)) or len(value) != count:
        raise InputError(None, f"{what} {value!r} is not a list of {count} numbers", fix)
    try:
        numbers = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise InputError(None, f"{what} {value!r} holds a value that is not a number", fix) from None
    if not all(math.isfinite(v) for v in numbers):
        raise InputError(None, f"{what} {value!r} holds a value that is not finite", fix)
    return numbers


def _clicks(value: Any, what: str) -> list[tuple[float, ...]]:
    """A JSON list of [x, y, z] clicks (None or [] for none)."""
    if value in (None, "", []):
        return []
    if not isinstance(value, (list, tuple)):
        raise InputError(None, f"{what} {value!r} is not a list of [x, y, z] clicks", f"e.g. {_EXAMPLE}")
    return [_numbers(click, 3, what) for click in value]


def _organs(value: Any, card: ConceptCard, labels: Sequence[str]) -> list[str]:
    """The "organs" entry: a list or a comma-separated string of names; all labels when absent."""
    if value in (None, "", []):
        return list(labels)
    words = value.split(",") if isinstance(value, str) else value
    if not isinstance(words, (list, tuple)):
        raise InputError(None, f"organs {value!r} is not a list of organ names", f"e.g. {_EXAMPLE}")
    return list(dict.fromkeys(_organ(w.strip() if isinstance(w, str) else w, card, labels, "organ") for w in words))


def _edited(request: Mapping[str, Any], card: ConceptCard, labels: Sequence[str]) -> str | None:
    """The organ being edited: "organ", or "label" as 3D Slicer sends the current segment's name (unless it is the
    path of a label file uploaded to MONAI Label, which uses the same key)."""
    for key in ("organ", "label"):
        value = request.get(key)
        if value in (None, "") or (key == "label" and isinstance(value, str) and Path(value).exists()):
            continue
        return _organ(value, card, labels, key)
    return None


def parse_request(request: Mapping[str, Any], card: ConceptCard, labels: Sequence[str]) -> InferRequest:
    """Organs to segment by name ("organs", default: every label) and the edit: clicks under an organ's name
    (DeepEdit), "foreground" / "background" clicks (Deepgrow) and a "box" [x0, y0, z0, x1, y1, z1], for the organ
    named by "organ" or "label" (3D Slicer sends every segment's clicks and names the one being edited: only that one
    is refined); without a name, each organ with clicks under its name is refined."""
    organs = _organs(request.get("organs"), card, labels)
    edited = _edited(request, card, labels)
    clicked = {name: _clicks(request.get(name), f"clicks of {name!r}") for name in labels}
    foreground = _clicks(request.get("foreground"), "foreground clicks")
    background = [(*click, 0) for click in _clicks(request.get(BACKGROUND), "background clicks")]
    box = None if request.get("box") in (None, "", []) else _numbers(request.get("box"), 6, "box")
    if edited is None:
        if foreground or box is not None:
            raise InputError(None, "foreground clicks or a box need the organ they outline", 'Add "organ": "<name>"')
        refined = [Refinement(name, None, [*((*c, 1) for c in clicks), *background])
                   for name, clicks in clicked.items() if clicks]
        if background and not refined:
            raise InputError(None, "background clicks alone do not say which organ they correct",
                             'Add "organ": "<name>", or clicks on the organ')
        return InferRequest(organs, refined, edit=bool(refined))
    positives = [(*c, 1) for c in [*clicked[edited], *foreground]]
    refined = [Refinement(edited, box, [*positives, *background])] if positives or box is not None else []
    return InferRequest(organs, refined, edit=True)


def place_box(box: Sequence[float], affine: np.ndarray, ras_affine: np.ndarray,
              shape: Sequence[int]) -> tuple[int, ...]:
    """A box in the client's voxel indices as an inclusive box of the RAS volume, clipped to it."""
    corners = np.array([[box[i] if c & (1 << i) == 0 else box[i + 3] for i in range(3)] for c in range(8)])
    voxels = np.rint(to_ras_voxels(corners, "voxel", affine, ras_affine))
    low, high, top = voxels.min(axis=0), voxels.max(axis=0), np.asarray(shape) - 1
    if np.any(high < 0) or np.any(low > top):
        raise InputError(None, f"box {list(box)} lies outside the image (shape {list(shape)})",
                         "Give voxel indices of this image")
    return tuple(int(v) for v in np.concatenate([np.clip(low, 0, top), np.clip(high, 0, top)]))


def place_points(points: Sequence[tuple[float, ...]], affine: np.ndarray, ras_affine: np.ndarray,
                 shape: Sequence[int]) -> list[tuple[int, int, int, int]]:
    """Clicks (x, y, z, label) in the client's voxel indices as RAS-volume voxels with their labels."""
    if not points:
        return []
    voxels = np.rint(to_ras_voxels(np.array([p[:3] for p in points]), "voxel", affine, ras_affine)).astype(int)
    top = np.asarray(shape) - 1
    for point, voxel in zip(points, voxels):
        if np.any(voxel < 0) or np.any(voxel > top):
            raise InputError(None, f"click {list(point[:3])} lies outside the image (shape {list(shape)})",
                             "Click inside the image")
    return [(int(x), int(y), int(z), int(p[3])) for (x, y, z), p in zip(voxels, points)]
