"""Train-test prompt consistency: CLIP-Guided SAM trained with one kind of prompt (text-only, mixed, ...) and each
model evaluated text-only and with boxes from the truth, on held-out slices (Dice pooled over slices per concept).

Every model starts from the same seed and trains on the same cached frozen-trunk features, so the prompts trained
with are the only difference. Models are evaluated through their adapted path (boxes go through the adapters and
the tuned decoder), which is what prompt consistency is about. Used by `benchmarks/prompt_consistency.py` and `notebooks/03_prompt_consistency`.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch

from medclipsam.data.concepts import ConceptCard
from medclipsam.data.frame import FrameSettings
from medclipsam.data.slices import frame_case, load_case, slice_items
from medclipsam.experiments.slice_dice import pooled_slice_dice
from medclipsam.models.clip_guided_sam import CLIPGuidedSAM, CLIPGuidedSAMConfig
from medclipsam.training.trainer import TrainConfig, Trainer, cache_features

EVALUATION_SETTINGS = ("text", "box")
MODE_NAMES = {"text": "text-only", "box": "boxes", "points": "points", "mixed": "mixed (text / box / points)"}


@dataclass
class ConsistencyResult:
    """One model: the prompts it trained with, its pooled Dice per evaluation setting and concept, training time."""

    mode: str
    scores: dict[str, dict[str, float]]  # "text" / "box" -> concept -> Dice
    seconds: float

    def mean(self, setting: str) -> float:
        """Mean Dice over the concepts in one evaluation setting."""
        values = list(self.scores[setting].values())
        return sum(values) / len(values)


def consistency_items(cases: Sequence[Mapping], card: ConceptCard, frame: FrameSettings,
                      slice_step: int = 1) -> list[dict]:
    """Slice items of labelled cases with every concept of the card listed (absent ones empty), no empty slices."""
    return [item for entry in cases for item in slice_items(frame_case(load_case(entry), frame), card,
                                                            empty_ratio=0.0, absent_per_slice=len(card.concepts),
                                                            slice_step=slice_step)]


def run_prompt_consistency(train_items: Sequence[dict], test_items: Sequence[dict], concepts: Sequence[str],
                           model_config: CLIPGuidedSAMConfig, train_config: TrainConfig,
                           modes: Sequence[str] = ("text", "mixed"), device: str | torch.device = "cpu",
                           progress: Callable[[str], None] | None = None) -> list[ConsistencyResult]:
    """Train one model per prompt mode (`train_config` with its mode replaced) and evaluate each in both settings."""
    torch.manual_seed(train_config.seed)
    base = CLIPGuidedSAM(model_config).to(device)
    features = cache_features(base, train_items)
    del base
    results = []
    for mode in modes:
        torch.manual_seed(train_config.seed)
        model = CLIPGuidedSAM(model_config).to(device)  # the same split as `base`, so the cached trunk fits
        start = time.perf_counter()
        Trainer(model, train_items, dataclasses.replace(train_config, mode=mode), features=features).fit()
        seconds = time.perf_counter() - start
        scores = {setting: pooled_slice_dice(model, test_items, concepts, with_boxes=setting == "box")
                  for setting in EVALUATION_SETTINGS}
        results.append(ConsistencyResult(mode, scores, seconds))
        if progress:
            progress(f"trained with {MODE_NAMES.get(mode, mode)} in {seconds:.0f} s: text-only Dice "
                     f"{results[-1].mean('text'):.3f}, with boxes {results[-1].mean('box'):.3f}")
    return results


def consistency_table(results: Sequence[ConsistencyResult], caption: str = "") -> str:
    """Markdown: mean Dice per (trained with, evaluated) pair, then per concept (text-only / boxes)."""
    lines = [caption, ""] if caption else []
    lines += ["| trained with | evaluated text-only | evaluated with boxes | training s |", "|---|---|---|---|"]
    for result in results:
        lines.append(f"| {MODE_NAMES.get(result.mode, result.mode)} | {result.mean('text'):.3f} | "
                     f"{result.mean('box'):.3f} | {result.seconds:.0f} |")
    concepts = list(results[0].scores["text"]) if results else []
    lines += ["", "Per organ (text-only / boxes):", "", "| organ | " + " | ".join(r.mode for r in results) + " |",
              "|---|" + "---|" * len(results)]
    for concept in concepts:
        cells = [f"{r.scores['text'][concept]:.2f} / {r.scores['box'][concept]:.2f}" for r in results]
        lines.append(f"| {concept} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def consistency_rows(results: Sequence[ConsistencyResult]) -> list[dict]:
    """Tidy rows (trained_with, evaluated, concept, dice) for CSV or a data frame."""
    return [{"trained_with": r.mode, "evaluated": setting, "concept": concept, "dice": dice}
            for r in results for setting, scores in r.scores.items() for concept, dice in scores.items()]
