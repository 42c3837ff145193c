"""The task's inferer: medclipsam's Predictor behind MONAI Label's data dictionary. A request without clicks or box
segments organs by name; clicks or a box re-run only the organs they name, on the image's cached predictor, and
leave every other organ as the client last got it."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from medclipsam.data.concepts import ConceptCard
from medclipsam.errors import InputError
from medclipsam.inference.predictor import Predictor, Segmentation

from lib.prompts import InferRequest, Refinement, parse_request, place_box, place_points
from lib.sessions import Session, Sessions, image_key


def refine_organ(predictor: Predictor, previous: Segmentation, organ: str, box: Sequence[int] | None,
                 points: Sequence[tuple[int, int, int, int]]) -> Segmentation:
    """`previous` with `organ` re-run from a box (the organ is replaced) or clicks (it is replaced on the axial slices
    the clicks prompt, and kept as it was elsewhere); other organs are left voxel for voxel (`Predictor.refine`)."""
    return predictor.refine(previous, organ, box=box, points=points)


def _useful(points: list[tuple[int, int, int, int]], box: Sequence[int] | None) -> list[tuple[int, int, int, int]]:
    """Negative clicks only on the axial slices the organ's positive clicks or box prompt: elsewhere (e.g. 3D
    Slicer's background clicks made while editing another organ) they would re-run the organ from nothing."""
    prompted = {p[2] for p in points if p[3] == 1} | (set() if box is None else set(range(box[2], box[5] + 1)))
    return [p for p in points if p[3] == 1 or p[2] in prompted]


def _placed(predictor: Predictor, refinements: Sequence[Refinement]) -> dict[str, tuple[Any, list]]:
    """Each refinement's box and clicks on the predictor's RAS volume (organs left with no prompt dropped)."""
    affine = np.asarray(predictor.scan.affine, dtype=np.float64)
    shape = predictor.frame.source_shape
    placed = {}
    for refinement in refinements:
        box = None if refinement.box is None else place_box(refinement.box, affine, predictor.ras_affine, shape)
        points = _useful(place_points(refinement.points, affine, predictor.ras_affine, shape), box)
        if box is not None or points:
            placed[refinement.organ] = (box, points)
    return placed


def answer(session: Session, request: InferRequest) -> tuple[Segmentation, list[str]]:
    """Segment by name (a request that edits nothing, or nothing segmented yet: prompted organs then win overlaps),
    or refine the last result of this image organ by organ (an edit without usable prompts returns it unchanged);
    also the organs that boxes or clicks prompted."""
    predictor, previous = session.predictor, session.result
    placed = _placed(predictor, request.refinements)
    if not request.edit or previous is None:
        organs = list(dict.fromkeys([*request.organs, *placed]))
        boxes = {organ: box for organ, (box, _) in placed.items() if box is not None}
        points = {organ: clicks for organ, (_, clicks) in placed.items() if clicks}
        return predictor.predict(organs, boxes=boxes, points=points), list(placed)
    result = previous
    for organ, (box, clicks) in placed.items():
        if organ not in result.concepts:
            raise InputError(None, f"{organ!r} was not segmented in this image's last result ({result.concepts})",
                             f'Segment it first: send {{"organs": [..., "{organ}"]}} without clicks')
        result = refine_organ(predictor, result, organ, box, clicks)
    return result, list(placed)


class PredictorInferer:
    """Callable on MONAI Label's data dictionary: reads the request, answers it on the image's session, and puts the
    Segmentation under "pred" (and whether the slice encodings were reused under "reused_encodings")."""

    def __init__(self, sessions: Sessions, card: ConceptCard, labels: Sequence[str]) -> None:
        self.sessions, self.card, self.labels = sessions, card, list(labels)

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        request = parse_request(data, self.card, self.labels)
        with self.sessions.lock:
            session, reused = self.sessions.open(image_key(data["image_path"]), data["image"])
            session.result, refined = answer(session, request)
        data["pred"] = session.result
        data["refined"] = refined
        data["reused_encodings"] = reused
        return data
