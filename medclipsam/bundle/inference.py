"""Bundle inference: label maps of scans by a trained method, written in each scan's own geometry."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Mapping, Sequence

from monai.data import Dataset, MetaTensor

from medclipsam.atomic import atomic_write
from medclipsam.data.concepts import ConceptCard
from medclipsam.data.datalists import case_id_from_path
from medclipsam.data.io import save_mask
from medclipsam.data.slices import LoadCase
from medclipsam.errors import OutputExistsError
from medclipsam.methods.base import SegmentationMethod, segment_case

LABELS_FILE = "labels.json"
logger = logging.getLogger(__name__)


def mask_name(case_id: str) -> str:
    """File name of a case's predicted label map."""
    return f"{case_id}_mask.nii.gz"


def segment_cases(method: SegmentationMethod, cases: Sequence[Mapping], card: ConceptCard, output_dir: str | Path,
                  modality: str = "CT", window: str | None = "abdomen", batch_size: int = 8,
                  overwrite: bool = False) -> list[Path]:
    """Segment every concept of `card` in each datalist item's image (text-only: the names are the only prompt) and
    write `output_dir/<case id>_mask.nii.gz` (values = the card's label ids) plus `labels.json`; returns the masks."""
    out = Path(output_dir)
    images = [{"image": item["image"], "case_id": item.get("case_id") or case_id_from_path(item["image"])}
              for item in cases]
    for item in images:  # refuse before the slow part, not after it
        if (out / mask_name(item["case_id"])).exists() and not overwrite:
            raise OutputExistsError(out / mask_name(item["case_id"]), "already exists; pass overwrite=True "
                                    "(bundle: --overwrite True) or choose another output_dir")
    out.mkdir(parents=True, exist_ok=True)
    labels = {"0": "background", **{str(i): name for i, name in card.label_map().items()}}
    atomic_write(out / LABELS_FILE, lambda temp: Path(temp).write_text(json.dumps(labels, indent=2)))
    written = []
    for case in Dataset(images, transform=LoadCase(modality, window)):
        predicted = segment_case(method, case, card, setting="text", batch_size=batch_size)
        written.append(save_mask(MetaTensor(predicted[None], affine=case["image"].affine), like=case["image_path"],
                                 path=out / mask_name(case["case_id"]), overwrite=overwrite))
        logger.info(f"{case['case_id']}: wrote {written[-1]}")
    return written
