"""Evaluate any registered method on labelled volumes: per-case, per-concept Dice/HD95/NSD and seconds per volume."""
from __future__ import annotations

import time
from typing import Any, Mapping, Sequence

from medclipsam.data.concepts import ConceptCard
from medclipsam.data.slices import load_case
from medclipsam.eval.metrics import evaluate_case
from medclipsam.methods.base import SegmentationMethod, segment_case


def evaluate_method(method: SegmentationMethod, cases: Sequence[Mapping[str, Any]], card: ConceptCard,
                    setting: str = "text", modality: str = "CT", window: str | None = "abdomen",
                    batch_size: int = 8) -> list[dict]:
    """Rows (one per case and concept) with the metrics, the method, the setting and seconds per volume."""
    rows: list[dict] = []
    for entry in cases:
        case = entry if "case_id" in entry and hasattr(entry.get("image"), "shape") else load_case(entry, modality, window)
        start = time.perf_counter()
        predicted = segment_case(method, case, card, setting=setting, batch_size=batch_size)
        seconds = time.perf_counter() - start
        spacing = tuple(float(s) for s in case["image"].pixdim[:3])
        for row in evaluate_case(predicted, case["label"][0], spacing, card.label_map(), str(case["case_id"]),
                                 method=method.name):
            rows.append({**row, "setting": setting, "seconds_per_volume": round(seconds, 2)})
    return rows
