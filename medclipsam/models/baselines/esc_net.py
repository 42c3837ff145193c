"""ESC-Net (Lee et al., "Effective SAM Combination for Open-Vocabulary Semantic Segmentation", CVPR 2025), built from
the paper's description (no public code): image-text correlation -> Pseudo Prompt Generator -> SAM prompt encoder ->
SAM mask-decoder (two-way transformer) blocks over the image features, all classes in parallel -> Vision-Language
Fusion -> a light decoder. The paper reports A-150 mIoU 41.8 with a ViT-L CLIP (CAT-Seg: 37.9).

Our adaptation to this package (the parts the paper leaves open or that the medical setting changes):
- Image features are the frozen SAM encoder's embedding (the prompt encoder and decoder blocks were trained on it);
  the correlation is the cosine similarity of a vision-language backbone's dense features with the class text
  embeddings, calibrated as `scale * cosine + bias`.
- The Pseudo Prompt Generator takes a softmax over [background (logit 0), classes], thresholds each class's
  probability and runs k-means over the coordinates of the pixels above it: the centres are positive point prompts,
  the binary mask the mask prompt. A class with no pixel above the threshold gets only "not a point" tokens.
- Each ESC block generates its own pseudo prompts (block 0 from the correlation, later blocks from a 1x1 class head
  on the current per-class features), runs one SAM two-way block (initialised from the SAM decoder's blocks) for
  every (image, class) pair as one batch, then the Vision-Language Fusion: a spatial bottleneck guided by the image
  features and an attention across classes at every location guided by the text embeddings.
- The light decoder upsamples the per-class features in stages guided by the slice's own pixels (the paper guides
  with CLIP's intermediate features, which a SAM or MiniLM backbone does not provide at higher resolution), and its
  output refines the last block's class logits, upsampled (a coarse-to-fine residual).
- New layers that add to a residual start at zero, so before training every block passes SAM's own features on.
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def kmeans_points(masks: torch.Tensor, count: int, iterations: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """K-means (k = `count`) over the (x, y) pixel coordinates of each of N binary masks (N, h, w), batched.

    Returns centres (N, count, 2) in grid coordinates (x, y) and found (N,) (False for an empty mask, whose centres
    are 0). Deterministic: the first centre is the mask pixel nearest the centroid, each next one the mask pixel
    farthest from those chosen (a small mask repeats centres); then `iterations` Lloyd steps.
    """
    if count < 1:
        raise ValueError(f"count must be a positive int, got {count!r}")
    n, height, width = masks.shape
    inside = masks.reshape(n, -1).bool()
    ys, xs = torch.meshgrid(torch.arange(height, device=masks.device), torch.arange(width, device=masks.device),
                            indexing="ij")
    coords = torch.stack([xs, ys], dim=-1).reshape(-1, 2).float()  # (hw, 2)
    weights = inside.float()
    found = inside.any(dim=1)
    centroid = (weights @ coords) / weights.sum(1, keepdim=True).clamp(min=1.0)  # (n, 2)
    outside = torch.full_like(weights, float("inf"))
    from_centroid = torch.cdist(centroid[:, None], coords[None])[:, 0]
    centres = [coords[torch.where(inside, from_centroid, outside).argmin(dim=1)]]
    closest = torch.cdist(centres[0][:, None], coords[None])[:, 0]
    for _ in range(1, count):
        centres.append(coords[torch.where(inside, closest, -outside).argmax(dim=1)])
        closest = torch.minimum(closest, torch.cdist(centres[-1][:, None], coords[None])[:, 0])
    centres_t = torch.stack(centres, dim=1)  # (n, count, 2)
    for _ in range(iterations):
        assignment = torch.cdist(coords[None].expand(n, -1, -1), centres_t).argmin(dim=2)  # (n, hw)
        sizes = weights.new_zeros(n, count).scatter_add_(1, assignment, weights)
        sums = weights.new_zeros(n, count, 2).scatter_add_(1, assignment[..., None].expand(-1, -1, 2),
                                                           coords[None] * weights[..., None])
        centres_t = torch.where(sizes[..., None] > 0, sums / sizes.clamp(min=1.0)[..., None], centres_t)
    return centres_t * found[:, None, None], found


def class_probabilities(class_logits: torch.Tensor) -> torch.Tensor:
    """(B, K, h, w) probabilities of a softmax over [background (logit 0), the K classes], background dropped."""
    with_background = torch.cat([torch.zeros_like(class_logits[:, :1]), class_logits], dim=1)
    return torch.softmax(with_background.float(), dim=1)[:, 1:]


@torch.no_grad()
def pseudo_prompts(class_logits: torch.Tensor, threshold: float, points_per_class: int, image_size: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Pseudo Prompt Generator for (B, K, h, w) class logits: softmax over [background (0), classes], threshold,
    k-means. Returns point coordinates (B*K, P, 2) in model-input pixels, point labels (B*K, P) (1, or -1 "not a
    point" for a class absent everywhere) and the binary masks (B*K, h, w)."""
    batch, classes, height, width = class_logits.shape
    masks = (class_probabilities(class_logits) > threshold).reshape(batch * classes, height, width)
    centres, found = kmeans_points(masks, points_per_class)
    scale = torch.tensor([image_size / width, image_size / height], device=centres.device)
    points = (centres + 0.5) * scale
    labels = torch.where(found, 1, -1)[:, None].expand(-1, points_per_class).to(torch.int64)
    return points, labels, masks


class VisionLanguageFusion(nn.Module):
    """Image guidance (a bottleneck over [class features; image features] with a depthwise 3x3) then text guidance
    (attention across the K classes at every location, queries and keys offset by each class's text embedding)."""

    def __init__(self, dim: int, text_dim: int, hidden: int, attention_dim: int) -> None:
        super().__init__()
        self.spatial = nn.Sequential(
            nn.Conv2d(2 * dim, hidden, 1), nn.GELU(), nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden),
            nn.GELU(), nn.Conv2d(hidden, dim, 1),
        )
        self.norm = nn.LayerNorm(dim)
        self.query, self.key, self.value = (nn.Linear(dim, attention_dim) for _ in range(3))
        self.text_query, self.text_key = nn.Linear(text_dim, attention_dim), nn.Linear(text_dim, attention_dim)
        self.out = nn.Linear(attention_dim, dim)
        for last in (self.spatial[-1], self.out):
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)

    def forward(self, features: torch.Tensor, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """(B, K, C, h, w) class features, (B, C, h, w) image features, (K, D) text -> (B, K, C, h, w)."""
        batch, classes, channels, height, width = features.shape
        guide = image[:, None].expand(-1, classes, -1, -1, -1)
        flat = features.reshape(batch * classes, channels, height, width)
        flat = flat + self.spatial(torch.cat([flat, guide.reshape_as(flat)], dim=1))
        tokens = flat.reshape(batch, classes, channels, height * width).permute(0, 3, 1, 2)  # (B, hw, K, C)
        normed = self.norm(tokens)
        text = text.to(tokens.dtype)
        attended = F.scaled_dot_product_attention(self.query(normed) + self.text_query(text),
                                                  self.key(normed) + self.text_key(text), self.value(normed))
        tokens = tokens + self.out(attended)
        return tokens.permute(0, 2, 3, 1).reshape(batch, classes, channels, height, width)


class LightDecoder(nn.Module):
    """Per-class features (N, C, h, w) -> one logit map (N, 1, h * 2^stages, ...): a 1x1 reduction, then per stage
    a x2 bilinear upsampling, the slice's own pixels at that scale (a 3x3 stem per stage) and a 3x3 convolution."""

    def __init__(self, dim: int, channels: int, guidance_channels: int, stages: int) -> None:
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(dim, channels, 1), nn.GELU())
        self.stems = nn.ModuleList(nn.Conv2d(3, guidance_channels, 3, padding=1) for _ in range(stages))
        self.fuse = nn.ModuleList(
            nn.Sequential(nn.Conv2d(channels + guidance_channels, channels, 3, padding=1), nn.GELU())
            for _ in range(stages)
        )
        self.head = nn.Conv2d(channels, 1, 1)

    def forward(self, features: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """`features` (B*K, C, h, w) grouped by image; `images` (B, 3, S, S) in [0, 1]."""
        repeats = features.shape[0] // images.shape[0]
        x = self.reduce(features)
        for stem, fuse in zip(self.stems, self.fuse):
            x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
            pixels = F.interpolate(images, size=tuple(x.shape[-2:]), mode="area")
            guide = stem(pixels).repeat_interleave(repeats, dim=0)
            x = fuse(torch.cat([x, guide], dim=1))
        return self.head(x)


class ESCBlock(nn.Module):
    """One ESC block: pseudo prompts from class logits -> SAM prompt encoder -> a SAM two-way block over every
    (image, class) pair -> Vision-Language Fusion -> class logits for the next block's prompts."""

    def __init__(self, sam_block: nn.Module, dim: int, text_dim: int, fusion_hidden: int, attention_dim: int) -> None:
        super().__init__()
        self.sam_block = sam_block
        self.fusion = VisionLanguageFusion(dim, text_dim, fusion_hidden, attention_dim)
        self.class_head = nn.Conv2d(dim, 1, 1)

    def forward(self, features: torch.Tensor, tokens: torch.Tensor, dense: torch.Tensor, position: torch.Tensor,
                image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, K, C, h, w) features, the prompts' sparse (B*K, T, C) and dense (B*K, C, h, w) embeddings, (1, C, h, w)
        positional encoding -> updated features and (B, K, h, w) class logits. As in SAM's decoder, the dense
        embedding is added to the image features the tokens attend to."""
        batch, classes, channels, height, width = features.shape
        keys = (features.reshape(batch * classes, channels, height, width) + dense).flatten(2).transpose(1, 2)
        key_pe = position.flatten(2).transpose(1, 2).expand(len(keys), -1, -1)
        _, keys = self.sam_block(queries=tokens, keys=keys, query_pe=tokens, key_pe=key_pe)
        features = keys.transpose(1, 2).reshape(batch, classes, channels, height, width)
        features = self.fusion(features, image, text)
        logits = self.class_head(features.reshape(batch * classes, channels, height, width))
        return features, logits.reshape(batch, classes, height, width)


class ESCNet(nn.Module):
    """ESC-Net's trainable part on top of frozen image features: correlation embedding, ESC blocks and the decoder.

    `prompt_encoder` and `decoder_blocks` (a SAM mask decoder's `transformer.layers`) are copied; block i starts from
    decoder block i mod depth. Works on a (g x g) feature grid; the mask prompt enters at 4g as in SAM.
    """

    def __init__(self, prompt_encoder: nn.Module, decoder_blocks: Sequence[nn.Module], text_dim: int,
                 image_size: int, blocks: int = 2, points_per_class: int = 3, prompt_threshold: float = 0.5,
                 fusion_hidden: int | None = None, attention_dim: int = 32, decoder_channels: int = 16,
                 guidance_channels: int = 8, upsample_stages: int = 2, similarity_scale: float = 10.0,
                 similarity_bias: float = -2.0) -> None:
        super().__init__()
        if blocks < 1:
            raise ValueError(f"blocks must be a positive int, got {blocks!r}")
        if not 0.0 < prompt_threshold < 1.0:
            raise ValueError(f"prompt_threshold must lie in (0, 1), got {prompt_threshold!r}")
        if points_per_class < 1:
            raise ValueError(f"points_per_class must be a positive int, got {points_per_class!r}")
        if not decoder_blocks:
            raise ValueError("ESC-Net needs the SAM decoder's two-way blocks; got none")
        self.prompt_encoder = copy.deepcopy(prompt_encoder).requires_grad_(True)
        self.dim = int(self.prompt_encoder.embed_dim)
        self.image_size = int(image_size)
        self.points_per_class = int(points_per_class)
        self.prompt_threshold = float(prompt_threshold)
        self.similarity_scale = nn.Parameter(torch.tensor(float(similarity_scale)))
        self.similarity_bias = nn.Parameter(torch.tensor(float(similarity_bias)))
        self.correlation_embed = nn.Sequential(nn.Conv2d(2, 32, 3, padding=1), nn.GELU(), nn.Conv2d(32, self.dim, 1))
        nn.init.zeros_(self.correlation_embed[-1].weight)
        nn.init.zeros_(self.correlation_embed[-1].bias)
        hidden = fusion_hidden or max(self.dim // 4, 8)
        self.blocks = nn.ModuleList(
            ESCBlock(copy.deepcopy(decoder_blocks[i % len(decoder_blocks)]).requires_grad_(True), self.dim, text_dim,
                     hidden, attention_dim)
            for i in range(blocks)
        )
        self.decoder = LightDecoder(self.dim, decoder_channels, guidance_channels, upsample_stages)

    def sam_parameters(self) -> list[nn.Parameter]:
        """Parameters that start from SAM (prompt encoder and two-way blocks): fine-tuned at their own rate."""
        return [*self.prompt_encoder.parameters(), *(p for b in self.blocks for p in b.sam_block.parameters())]

    def correlation_logits(self, cosine: torch.Tensor) -> torch.Tensor:
        """Calibrated image-text correlation `scale * cosine + bias` (B, K, h, w)."""
        return self.similarity_scale * cosine + self.similarity_bias

    def prompt_tokens(self, class_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sparse (B*K, P + 1, C) and dense (B*K, C, h, w) embeddings of the pseudo prompts of (B, K, h, w) logits."""
        points, labels, masks = pseudo_prompts(class_logits.detach(), self.prompt_threshold, self.points_per_class,
                                               self.image_size)
        mask_input = F.interpolate(masks[:, None].float(), scale_factor=4.0, mode="nearest")
        return self.prompt_encoder(points=(points, labels), boxes=None, masks=mask_input)

    def forward(self, embedding: torch.Tensor, cosine: torch.Tensor, text: torch.Tensor,
                images: torch.Tensor) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """`embedding` (B, C, g, g) image features, `cosine` (B, K, g, g) correlation, `text` (K, D) embeddings,
        `images` (B, 3, S, S) -> "logits" (B, K, S, S) and "grid_logits": the class logits each block's prompts
        came from (B, K, g, g), the calibrated correlation first."""
        batch, classes, height, width = cosine.shape
        position = self.prompt_encoder.pe_layer((height, width))[None]
        class_logits = self.correlation_logits(cosine)
        grid_logits = [class_logits]
        correlation = torch.stack([cosine, class_probabilities(class_logits).to(cosine.dtype)], dim=2)
        embedded = self.correlation_embed(correlation.reshape(batch * classes, 2, height, width))
        features = embedding[:, None] + embedded.reshape(batch, classes, self.dim, height, width)
        for block in self.blocks:
            sparse, dense = self.prompt_tokens(class_logits)
            features, class_logits = block(features, sparse, dense, position, embedding, text)
            grid_logits.append(class_logits)
        refined = self.decoder(features.reshape(batch * classes, self.dim, height, width), images)
        coarse = F.interpolate(class_logits.reshape(batch * classes, 1, height, width), size=refined.shape[-2:],
                               mode="bilinear", align_corners=False)
        logits = (refined + coarse).reshape(batch, classes, *refined.shape[-2:])
        if logits.shape[-1] != self.image_size or logits.shape[-2] != self.image_size:
            logits = F.interpolate(logits, size=(self.image_size, self.image_size), mode="bilinear",
                                   align_corners=False)
        return {"logits": logits, "grid_logits": grid_logits}
