"""Prompt-consistent training of CLIP-Guided SAM on cached frozen-trunk features.

The frozen encoder trunk (and the bare embedding) of every training slice is computed once and kept in memory as
float16; each step then runs only the adapted blocks, the prompt encoder and the mask decoder for its (slice, concept)
pairs. That is what makes training fit in CPU minutes.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from medclipsam.models.clip_guided_sam import CLIPGuidedSAM, ImageFeatures
from medclipsam.training.losses import CLIPGuidedSAMLoss
from medclipsam.training.prompt_simulation import choose_modes, simulate_prompts


@dataclass
class TrainConfig:
    """Optimisation settings; learning rates are per parameter group."""

    steps: int = 200
    slices_per_step: int = 2
    mode: str = "text"  # "text", "box", "points" or "mixed": train as you will infer
    lr_adapters: float = 1e-3  # adapters, text/similarity heads, VL projection
    lr_decoder: float = 1e-4
    lr_prompt_encoder: float = 1e-5
    weight_decay: float = 1e-4
    n_points: int = 5
    box_jitter: float = 0.1
    seed: int = 0


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch so runs repeat on the same machine."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def parameter_groups(model: CLIPGuidedSAM, config: TrainConfig) -> list[dict]:
    """AdamW groups: decoder, prompt encoder, and everything else that trains (adapters and heads)."""
    decoder = [p for p in model.sam.mask_decoder.parameters() if p.requires_grad]
    prompt = [p for p in model.sam.prompt_encoder.parameters() if p.requires_grad]
    taken = {id(p) for p in decoder + prompt}
    rest = [p for p in dict((id(p), p) for p in model.parameters()).values() if p.requires_grad and id(p) not in taken]
    groups = [{"params": rest, "lr": config.lr_adapters}]
    if decoder:
        groups.append({"params": decoder, "lr": config.lr_decoder})
    if prompt:
        groups.append({"params": prompt, "lr": config.lr_prompt_encoder})
    return groups


@torch.no_grad()
def cache_features(model: CLIPGuidedSAM, items: Sequence[dict], progress: Callable[[str], None] | None = None
                   ) -> list[ImageFeatures]:
    """Frozen features of every slice item, stored as float16 on the CPU."""
    cached = []
    for number, item in enumerate(items, 1):
        features = model.encode_image(item["image"][None].to(model.device))
        cached.append(features.to("cpu", torch.float16))
        if progress:
            progress(f"cached {number}/{len(items)} slices")
    return cached


class Trainer:
    """Trains a CLIPGuidedSAM on slice items (from `medclipsam.data.slices.slice_items`)."""

    def __init__(self, model: CLIPGuidedSAM, items: Sequence[dict], config: TrainConfig | None = None,
                 progress: Callable[[str], None] | None = None) -> None:
        self.model, self.items, self.config = model, list(items), config or TrainConfig()
        seed_everything(self.config.seed)
        self.generator = torch.Generator().manual_seed(self.config.seed)
        self.features = cache_features(model, self.items, progress)
        self.optimizer = torch.optim.AdamW(parameter_groups(model, self.config), weight_decay=self.config.weight_decay)
        self.loss = CLIPGuidedSAMLoss()
        self.progress = progress
        self.history: list[dict[str, float]] = []

    def step(self, indices: Sequence[int]) -> dict[str, float]:
        """One optimisation step over the pairs of the given slices."""
        model, device = self.model, self.model.device
        model.train()
        image_index, concepts, masks, present = [], [], [], []
        for position, index in enumerate(indices):
            item = self.items[index]
            image_index += [position] * len(item["concepts"])
            concepts += list(item["concepts"])
            masks.append(item["masks"])
            present += list(item["present"])
        features = ImageFeatures.cat([self.features[i] for i in indices]).to(device, torch.float32)
        masks_all = torch.cat(masks).to(device)
        text = model.encode_concepts(concepts)
        modes = choose_modes(self.config.mode, present, self.generator)
        pair_index = torch.tensor(image_index, device=device)
        total = torch.zeros((), device=device)
        terms: dict[str, float] = {}
        for mode in sorted(set(modes)):
            chosen = torch.tensor([i for i, m in enumerate(modes) if m == mode], device=device)
            prompts = simulate_prompts(masks_all[chosen].cpu(), [mode] * len(chosen), self.generator,
                                       self.config.n_points, self.config.box_jitter).to(device)
            out = model.decode(features.select(pair_index[chosen]), text[chosen], prompts)
            group = self.loss(out, masks_all[chosen])
            total = total + group["total"] * len(chosen) / len(modes)
            for name, value in group.items():
                terms[name] = terms.get(name, 0.0) + float(value.detach()) * len(chosen) / len(modes)
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()
        return terms

    def fit(self) -> list[dict[str, float]]:
        """Run `config.steps` steps over shuffled slices; returns the per-step loss terms."""
        order: list[int] = []
        rng = random.Random(self.config.seed)
        for step in range(1, self.config.steps + 1):
            if len(order) < self.config.slices_per_step:
                fresh = list(range(len(self.items)))
                rng.shuffle(fresh)
                order += fresh
            indices, order = order[: self.config.slices_per_step], order[self.config.slices_per_step:]
            terms = self.step(indices)
            self.history.append(terms)
            if self.progress and (step % 10 == 0 or step == self.config.steps):
                self.progress(f"step {step}/{self.config.steps} loss {terms['total']:.4f}")
        self.model.eval()
        return self.history
