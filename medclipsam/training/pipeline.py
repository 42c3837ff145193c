"""Datalist in, trained model out: the steps shared by `medclipsam train`, the bundle and the scripts."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from tqdm.auto import tqdm

from medclipsam.data.concepts import ConceptCard
from medclipsam.data.slices import load_case, slice_items
from medclipsam.models.clip_guided_sam import CLIPGuidedSAM, CLIPGuidedSAMConfig
from medclipsam.training.trainer import TrainConfig, Trainer


def training_items(cases: Sequence[Mapping[str, Any]], card: ConceptCard, size: int = 256, slice_step: int = 1,
                   empty_ratio: float = 0.1, seed: int = 0, modality: str = "CT", window: str | None = "abdomen",
                   show_progress: bool = False) -> list[dict]:
    """Slice items of labelled datalist items, each slice carrying every concept of the card (absent ones empty),
    so the similarity map learns what is not there as well as what is."""
    items: list[dict] = []
    for entry in tqdm(cases, desc="loading cases", disable=not show_progress):
        case = load_case(entry, modality, window)
        items += slice_items(case, card, size=size, empty_ratio=empty_ratio, absent_per_slice=len(card.concepts),
                             seed=seed, slice_step=slice_step)
    return items


def train_clip_guided_sam(cases: Sequence[Mapping[str, Any]], card: ConceptCard, out_dir: str | Path,
                          model_config: CLIPGuidedSAMConfig | None = None, train_config: TrainConfig | None = None,
                          slice_step: int = 1, empty_ratio: float = 0.1, modality: str = "CT",
                          window: str | None = "abdomen", show_progress: bool = False,
                          device: str = "cpu") -> CLIPGuidedSAM:
    """Train on labelled datalist items; `out_dir` gets `model/` (the checkpoint), `log.csv` and a resumable state."""
    train_config = train_config or TrainConfig()
    model = CLIPGuidedSAM(model_config or CLIPGuidedSAMConfig()).to(device)
    items = training_items(cases, card, model.sam.image_size, slice_step, empty_ratio, train_config.seed, modality,
                           window, show_progress)
    Trainer(model, items, train_config, out_dir=out_dir, show_progress=show_progress).fit()
    return model
