"""Bundle evaluation: Dice/HD95/NSD of a trained method on labelled cases, per case and summarised."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping, Sequence

from medclipsam.data.concepts import ConceptCard
from medclipsam.errors import OutputExistsError
from medclipsam.eval.evaluate import evaluate_method
from medclipsam.eval.metrics import summarize, write_table
from medclipsam.inference.predictor import SliceModel

METRICS_FILE = "metrics.csv"
SUMMARY_FILE = "summary.csv"
logger = logging.getLogger(__name__)


def evaluate_cases(method: SliceModel, cases: Sequence[Mapping], card: ConceptCard, output_dir: str | Path,
                   setting: str = "text", batch_size: int = 8, overwrite: bool = False) -> list[dict]:
    """Write `metrics.csv` (one row per case and concept) and `summary.csv` (mean ± sd per concept and overall) to
    `output_dir`; returns the summary rows."""
    out = Path(output_dir)
    for name in (METRICS_FILE, SUMMARY_FILE):
        if (out / name).exists() and not overwrite:
            raise OutputExistsError(out / name, "already exists; pass overwrite=True (bundle: --overwrite True) "
                                    "or choose another output_dir")
    rows = evaluate_method(method, cases, card, setting=setting, batch_size=batch_size)
    write_table(rows, out / METRICS_FILE, overwrite=overwrite)
    summary = summarize(rows)
    write_table(summary, out / SUMMARY_FILE, overwrite=overwrite)
    for row in summary:
        logger.info(f"{row['method']} {setting} {row['concept']}: dice {row['dice_mean']:.3f} ± {row['dice_sd']:.3f}, "
                    f"hd95 {row['hd95_mean']:.1f} mm, nsd {row['nsd_mean']:.3f} (n={row['n']})")
    return summary
