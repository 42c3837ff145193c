"""Bundle inference: label maps of scans by a trained method through the predictor, written in each scan's own
geometry."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Mapping, Sequence

from medclipsam.atomic import atomic_write
from medclipsam.data.concepts import ConceptCard
from medclipsam.data.datalists import case_id_from_path
from medclipsam.errors import OutputExistsError
from medclipsam.inference.predictor import Predictor, SliceModel

LABELS_FILE = "labels.json"
logger = logging.getLogger(__name__)


def mask_name(case_id: str) -> str:
    """File name of a case's predicted label map."""
    return f"{case_id}_mask.nii.gz"


def segment_cases(method: SliceModel, cases: Sequence[Mapping], card: ConceptCard, output_dir: str | Path,
                  batch_size: int = 8, overwrite: bool = False) -> list[Path]:
    """Segment every concept of `card` in each datalist item's image (text-only: the names are the only prompt) and
    write `output_dir/<case id>_mask.nii.gz` (values = the card's label ids) plus `labels.json`; returns the masks."""
    out = Path(output_dir)
    images = [(str(item["image"]), item.get("case_id") or case_id_from_path(item["image"])) for item in cases]
    for _, case_id in images:  # refuse before the slow part, not after it
        if (out / mask_name(case_id)).exists() and not overwrite:
            raise OutputExistsError(out / mask_name(case_id), "already exists; pass overwrite=True "
                                    "(bundle: --overwrite True) or choose another output_dir")
    out.mkdir(parents=True, exist_ok=True)
    labels = {"0": "background", **{str(i): name for i, name in card.label_map().items()}}
    atomic_write(out / LABELS_FILE, lambda temp: Path(temp).write_text(json.dumps(labels, indent=2)))
    predictor = Predictor(method, device=next(method.parameters()).device, batch_size=batch_size)
    written = []
    values = {name: card.resolve(name).label_id for name in card.names()}
    for image, case_id in images:
        predictor.set_volume(image)
        written.append(predictor.predict(card.names()).save(out / mask_name(case_id), values, overwrite=overwrite))
        logger.info(f"{case_id}: wrote {written[-1]}")
    return written
