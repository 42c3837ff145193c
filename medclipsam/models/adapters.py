"""Semantic adapters inside SAM encoder blocks (CLIP-Guided SAM).

Per adapted block: a bottleneck adapter on the attention output, and a multi-modal adapter parallel to the MLP,
`mlp(x) + scale * fc2(GELU(fc1(norm(x)) + T' + U))`, with T' = GELU(Linear(text)) broadcast over the grid and
U = Linear(dense features + similarity) resized to the block's grid. The paper adds T' and U before fc1 at full width;
since fc1 is linear, adding them after it in the bottleneck width is the same family of functions with 4x fewer
conditioning weights (that keeps a ViT-B model's trainable share under 10%). Both adapters' last projections start at
zero, so an unadapted-but-wrapped encoder computes exactly what its backbone computes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ConditioningContext:
    """Per-(image, concept) conditioning read by every multi-modal adapter during one encoder-head pass."""

    text: torch.Tensor | None = None  # (N, text_dim)
    dense: torch.Tensor | None = None  # (N, dense_dim, h, w): dense VL features with the similarity map appended
    enabled: bool = True  # False runs the bare backbone (adapters bypassed), e.g. for concept-free features

    def set(self, text: torch.Tensor, dense: torch.Tensor) -> None:
        """Install the conditioning for the next head pass."""
        self.text, self.dense, self.enabled = text, dense, True

    def clear(self) -> None:
        """Forget the conditioning (so nothing stale leaks into a later pass)."""
        self.text, self.dense = None, None


class BottleneckAdapter(nn.Module):
    """x + scale * up(GELU(down(x))), token-wise; `up` starts at zero."""

    def __init__(self, dim: int, ratio: float = 0.25, scale: float = 0.5) -> None:
        super().__init__()
        hidden = max(1, int(dim * ratio))
        self.down = nn.Linear(dim, hidden)
        self.up = nn.Linear(hidden, dim)
        self.scale = scale
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.scale * self.up(F.gelu(self.down(x)))


class MultiModalAdapter(nn.Module):
    """scale * fc2(GELU(fc1(norm(x)) + T' + U)): text and dense-feature conditioning for one block; fc2 starts at zero."""

    def __init__(self, dim: int, text_dim: int, dense_dim: int, ratio: float = 0.25, scale: float = 0.5) -> None:
        super().__init__()
        hidden = max(1, int(dim * ratio))
        self.norm = nn.LayerNorm(dim)
        self.text_proj = nn.Linear(text_dim, hidden)
        self.dense_proj = nn.Linear(dense_dim, hidden)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.scale = scale
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: torch.Tensor, context: ConditioningContext) -> torch.Tensor:
        if context.text is None or context.dense is None:
            raise RuntimeError("multi-modal adapter called without conditioning; use CLIPGuidedSAM, not the raw encoder")
        channels_last_grid = x.dim() == 4  # ViT blocks: (N, H, W, C); TinyViT blocks: (N, L, C)
        n = x.shape[0]
        if channels_last_grid:
            height, width = x.shape[1], x.shape[2]
        else:
            height = width = int(round(x.shape[1] ** 0.5))
        text = F.gelu(self.text_proj(context.text.to(x.dtype)))  # (N, hidden)
        dense = F.interpolate(context.dense.to(x.dtype), size=(height, width), mode="bilinear", align_corners=False)
        u = self.dense_proj(dense.permute(0, 2, 3, 1))  # (N, H, W, hidden)
        if channels_last_grid:
            cond = text[:, None, None, :] + u
        else:
            cond = text[:, None, :] + u.reshape(n, height * width, -1)
        return self.scale * self.fc2(F.gelu(self.fc1(self.norm(x)) + cond))


class AdaptedAttention(nn.Module):
    """A block's attention followed by a bottleneck adapter on its output."""

    def __init__(self, attention: nn.Module, adapter: BottleneckAdapter, context: ConditioningContext) -> None:
        super().__init__()
        self.attention = attention
        self.adapter = adapter
        self.context = context

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.attention(x)
        return self.adapter(out) if self.context.enabled else out


class AdaptedMlp(nn.Module):
    """A block's MLP plus the multi-modal adapter in parallel, conditioned through a shared context."""

    def __init__(self, mlp: nn.Module, adapter: MultiModalAdapter, context: ConditioningContext) -> None:
        super().__init__()
        self.mlp = mlp
        self.adapter = adapter
        self.context = context

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.mlp(x)
        return out + self.adapter(x, self.context) if self.context.enabled else out


def block_dim(block: nn.Module) -> int:
    """Channel width of a SAM ViT block or a TinyViT block."""
    if hasattr(block, "dim"):
        return int(block.dim)
    return int(block.norm1.normalized_shape[0])


def install_adapters(
    blocks: Sequence[nn.Module],
    indices: Sequence[int],
    text_dim: int,
    dense_dim: int,
    context: ConditioningContext,
    ratio: float = 0.25,
    scale: float = 0.5,
) -> nn.ModuleDict:
    """Wrap the attention and MLP of the chosen blocks with adapters; returns the adapters, keyed by block index."""
    adapters = nn.ModuleDict()
    for index in sorted(set(indices)):
        if not 0 <= index < len(blocks):
            raise ValueError(f"adapter block index {index} out of range: the encoder has {len(blocks)} blocks")
        block = blocks[index]
        dim = block_dim(block)
        bottleneck = BottleneckAdapter(dim, ratio=ratio, scale=scale)
        multimodal = MultiModalAdapter(dim, text_dim, dense_dim, ratio=ratio, scale=scale)
        block.attn = AdaptedAttention(block.attn, bottleneck, context)
        block.mlp = AdaptedMlp(block.mlp, multimodal, context)
        adapters[str(index)] = nn.ModuleDict({"attention": bottleneck, "multimodal": multimodal})
    return adapters
