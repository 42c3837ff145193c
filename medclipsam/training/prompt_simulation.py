"""Simulated user prompts for training, so that training matches the inference mode (train-test prompt consistency).

Modes: "text" (the word alone), "box" (text + a jittered box around the mask), "points" (text + k positive clicks
sampled inside the mask), "mixed" (each pair draws one of those). Spatial prompts are only simulated for concepts
present in the slice: nobody boxes an organ that is not there.
"""
from __future__ import annotations

from typing import Sequence

import torch

from medclipsam.models.prompts import SpatialPrompts, mask_box

PROMPT_MODES = ("text", "box", "points", "mixed")


def jittered_box(mask: torch.Tensor, generator: torch.Generator, jitter: float = 0.1) -> torch.Tensor:
    """(x0, y0, x1, y1) around a binary (H, W) mask, each side moved by up to `jitter` of the box size."""
    x0, y0, x1, y1 = mask_box(mask)
    width, height = x1 - x0 + 1, y1 - y0 + 1
    shift = (torch.rand(4, generator=generator) * 2 - 1) * jitter
    box = torch.stack([x0 + shift[0] * width, y0 + shift[1] * height, x1 + shift[2] * width, y1 + shift[3] * height])
    limit = torch.tensor([mask.shape[1] - 1, mask.shape[0] - 1] * 2, dtype=box.dtype)
    return box.clamp(min=torch.zeros(4), max=limit)


def positive_points(mask: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` (x, y) clicks drawn uniformly from the mask's pixels (with replacement if the mask is small)."""
    ys, xs = torch.nonzero(mask > 0.5, as_tuple=True)
    picks = torch.randint(len(xs), (count,), generator=generator)
    return torch.stack([xs[picks], ys[picks]], dim=-1).float()


def choose_modes(mode: str, present: Sequence[bool], generator: torch.Generator) -> list[str]:
    """Per pair, the prompt type to simulate: absent concepts are always text-only."""
    if mode not in PROMPT_MODES:
        raise ValueError(f"prompt mode {mode!r}: choose one of {', '.join(PROMPT_MODES)}")
    spatial = ("box", "points")
    modes = []
    for is_present in present:
        if not is_present or mode == "text":
            modes.append("text")
        elif mode == "mixed":
            modes.append(("text", *spatial)[int(torch.randint(3, (1,), generator=generator))])
        else:
            modes.append(mode)
    return modes


def simulate_prompts(masks: torch.Tensor, modes: Sequence[str], generator: torch.Generator,
                     n_points: int = 5, box_jitter: float = 0.1) -> SpatialPrompts:
    """SpatialPrompts for pairs that all share one mode (group pairs by `choose_modes` first); masks (N, H, W)."""
    kinds = set(modes)
    if len(kinds) != 1:
        raise ValueError(f"simulate_prompts takes pairs of one mode at a time, got {sorted(kinds)}")
    kind = kinds.pop()
    if kind == "text":
        return SpatialPrompts()
    if kind == "box":
        return SpatialPrompts(boxes=torch.stack([jittered_box(m, generator, box_jitter) for m in masks]))
    points = torch.stack([positive_points(m, n_points, generator) for m in masks])
    return SpatialPrompts(points=points, point_labels=torch.ones(points.shape[:2], dtype=torch.int64))
