"""Split a SAM image encoder into a frozen trunk and an adapted head at block granularity.

The trunk (everything before the first adapted block) does not depend on the concept, so it is computed once per
slice and shared by every concept (inference) or cached once per slice (training).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

Step = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class EncoderSteps:
    """The encoder as an ordered list of steps; `block_steps[i]` is the step index of transformer block i."""

    steps: list[Step]
    blocks: list[nn.Module]
    block_steps: list[int]

    def run(self, x: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Apply steps [start, stop) to x."""
        for step in self.steps[start:stop]:
            x = step(x)
        return x

    def step_of_block(self, block_index: int) -> int:
        """Step index where transformer block `block_index` runs."""
        return self.block_steps[block_index]


def _tinyvit_to_grid(neck: nn.Module) -> Step:
    def finish(tokens: torch.Tensor) -> torch.Tensor:
        batch, length, channels = tokens.shape
        side = math.isqrt(length)
        grid = tokens.view(batch, side, side, channels).permute(0, 3, 1, 2)
        return neck(grid)

    return finish


def tinyvit_steps(encoder: nn.Module) -> EncoderSteps:
    """Steps of a TinyViT (LiteMedSAM / MobileSAM) encoder: patch embed, conv stage, each attention block, merges, neck."""
    steps: list[Step] = [encoder.patch_embed, encoder.layers[0]]
    blocks: list[nn.Module] = []
    block_steps: list[int] = []
    for layer in encoder.layers[1:]:
        for block in layer.blocks:
            block_steps.append(len(steps))
            blocks.append(block)
            steps.append(block)
        if layer.downsample is not None:
            steps.append(layer.downsample)
    steps.append(_tinyvit_to_grid(encoder.neck))
    return EncoderSteps(steps=steps, blocks=blocks, block_steps=block_steps)


def vit_steps(encoder: nn.Module) -> EncoderSteps:
    """Steps of a segment_anything ImageEncoderViT: patch embed (+ absolute position), each block, neck."""

    def embed(x: torch.Tensor) -> torch.Tensor:
        x = encoder.patch_embed(x)
        return x if encoder.pos_embed is None else x + encoder.pos_embed

    steps: list[Step] = [embed]
    blocks: list[nn.Module] = []
    block_steps: list[int] = []
    for block in encoder.blocks:
        block_steps.append(len(steps))
        blocks.append(block)
        steps.append(block)
    steps.append(lambda x: encoder.neck(x.permute(0, 3, 1, 2)))
    return EncoderSteps(steps=steps, blocks=blocks, block_steps=block_steps)


def encoder_steps(encoder: nn.Module, family: str) -> EncoderSteps:
    """Steps for a SAM image encoder of the given family ("tinyvit" or "vit")."""
    if family == "tinyvit":
        return tinyvit_steps(encoder)
    if family == "vit":
        return vit_steps(encoder)
    raise ValueError(f"unknown encoder family {family!r}; expected 'tinyvit' or 'vit'")
