"""Two-stage baseline (MedCLIP-SAM style): a vision-language similarity map, then a frozen SAM prompted from it.

Stage 1: cosine similarity of the concept's text embedding with dense image features, calibrated as
`sigmoid(scale * cosine + bias)`. With the offline "minilm" backbone the dense features are a projection of SAM's
image embedding; only that projection and the scale/bias are trained, with a per-pixel BCE against the masks pooled
to the feature grid. With an open_clip backbone (MaskCLIP dense features) nothing is trained: scale and bias stay at
their given values. The BCE weighs organ pixels `pos_weight` (4) times: an organ covers a few per cent of a slice,
and with plain BCE the small ones never cross the threshold, so stage 2 would get no box for them.
Stage 2: similarity probability -> threshold -> largest connected component -> its box (plus optional peak points)
-> frozen SAM (LiteMedSAM by default) prompt encoder and mask decoder. No adapters anywhere.

Settings: "text" (prompts from the similarity map; a concept whose map stays below the threshold everywhere predicts
an empty mask) and "manual" (the given boxes go straight to SAM; stage 1 is not used).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medclipsam.methods.base import vocabulary_targets
from medclipsam.methods.sam_method import SamMethod
from medclipsam.models.prompts import SpatialPrompts, largest_component, mask_box
from medclipsam.models.sam_layer import backbone_masks, to_image_size
from medclipsam.training.loop import TrainBudget, run_steps


def peak_points(prob: torch.Tensor, region: torch.Tensor, count: int) -> torch.Tensor:
    """(count, 2) (x, y) pixels of highest probability inside `region` (repeats when it has fewer pixels)."""
    scores = torch.where(region, prob, torch.full_like(prob, -1.0)).flatten()
    top = scores.topk(min(count, int(region.sum()))).indices
    top = top[torch.arange(count, device=top.device) % len(top)]
    width = prob.shape[-1]
    return torch.stack([top % width, top // width], dim=-1).float()


class TwoStage(SamMethod):
    """Similarity map -> box (+ points) -> frozen SAM; only the minilm projection and calibration train.

    `backbones`: `sam`, `sam_checkpoint`, `vision_language` (default minilm; an instance is used as is, its
    projection trains in place), `vision_language_kwargs` and `seed`, as `SamMethod` takes them. `threshold` applies
    to the stage-1 probability; `peak_points` adds that many positive clicks at the highest probabilities of the
    chosen region.
    """

    name = "two_stage"
    settings = ("text", "manual")

    default_vision_language = "minilm"

    def __init__(
        self,
        concepts: Sequence[str],
        threshold: float = 0.5,
        peak_points: int = 0,
        similarity_scale: float = 10.0,
        similarity_bias: float = -2.0,
        pos_weight: float = 4.0,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        **backbones: Any,
    ) -> None:
        super().__init__(concepts, **backbones)
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must lie in (0, 1), got {threshold!r}")
        if not isinstance(peak_points, int) or peak_points < 0:
            raise ValueError(f"peak_points must be a non-negative int, got {peak_points!r}")
        self.threshold, self.n_points = float(threshold), peak_points
        if not pos_weight > 0:
            raise ValueError(f"pos_weight must be > 0, got {pos_weight!r}")
        self.lr, self.weight_decay, self.pos_weight = lr, weight_decay, float(pos_weight)
        self.trains_similarity = self.vision_language.trainable_part() is not None
        self.similarity_scale = nn.Parameter(torch.tensor(float(similarity_scale)),
                                             requires_grad=self.trains_similarity)
        self.similarity_bias = nn.Parameter(torch.tensor(float(similarity_bias)), requires_grad=self.trains_similarity)
        # SAM is frozen, so the embedding of the last image batch can serve the next call on the same images (text
        # and manual predictions of one batch, or stage 1 then stage 2)
        self._last_encoded: tuple[torch.Tensor, torch.Tensor] | None = None

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Frozen SAM image embedding (B, C, h, w) of model-size images in [0, 1]; the last batch is remembered."""
        last = self._last_encoded
        if (last is not None and last[0].shape == images.shape and last[0].device == images.device
                and torch.equal(last[0], images)):
            return last[1]
        embedding = self.sam.encode(images)
        self._last_encoded = (images.detach().clone(), embedding)
        return embedding

    # --------------------------------------------------------------------------------------------------- stage 1

    def similarity_logits(self, images: torch.Tensor | None, sam_embedding: torch.Tensor | None,
                          concepts: Sequence[str]) -> torch.Tensor:
        """(B, K, h, w) calibrated similarity logits `scale * cosine + bias` on the VL backbone's feature grid."""
        vl = self.vision_language
        dense = vl.dense_features(images, sam_embedding)
        text = vl.encode_concepts(list(concepts)).to(dense.device, dense.dtype)
        return self.similarity_scale * vl.similarity(text, dense) + self.similarity_bias

    def similarity_probs(self, images: torch.Tensor, concepts: Sequence[str],
                         sam_embedding: torch.Tensor | None = None) -> torch.Tensor:
        """(B, K, S, S) stage-1 probabilities at model size (bilinear from the feature grid)."""
        images = images.to(self.device).float()
        if sam_embedding is None:
            sam_embedding = self.embed(images)
        logits = self.similarity_logits(images, sam_embedding, concepts)
        size = (self.image_size, self.image_size)
        return torch.sigmoid(F.interpolate(logits, size=size, mode="bilinear", align_corners=False))

    def fit(self, labelled: Sequence[dict], unlabelled: Sequence[dict], budget: TrainBudget,
            progress: Callable[[str], None] | None = None, work_dir: Path | None = None) -> list[dict[str, float]]:
        """Train the minilm projection and calibration with BCE on cached SAM embeddings; open_clip: nothing to do.

        Every concept of the vocabulary is trained on every slice (a concept a slice item does not list is absent).
        """
        if not self.trains_similarity:
            if progress:
                progress("two_stage: open_clip similarity is training-free; nothing to fit")
            return []
        if not labelled:
            raise ValueError("two_stage.fit needs at least one labelled slice item for the minilm projection")
        targets = [vocabulary_targets(item, self.concepts, self.name) for item in labelled]
        device = self.device
        torch.manual_seed(budget.seed)
        with torch.no_grad():
            embeddings = []
            for number, item in enumerate(labelled, 1):
                embeddings.append(self.sam.encode(item["image"][None].to(device).float()).to("cpu", torch.float16))
                if progress and (number % 10 == 0 or number == len(labelled)):
                    progress(f"two_stage: cached {number}/{len(labelled)} SAM embeddings")
        grid = tuple(embeddings[0].shape[-2:])
        pooled = [F.adaptive_avg_pool2d(t[None], grid)[0] for t in targets]
        parameters = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(parameters, lr=self.lr, weight_decay=self.weight_decay)

        def loss(indices: list[int], step: int) -> tuple[torch.Tensor, dict[str, float]]:
            features = torch.cat([embeddings[i] for i in indices]).to(device, torch.float32)
            target = torch.stack([pooled[i] for i in indices]).to(device)
            logits = self.similarity_logits(None, features, self.concepts)
            value = F.binary_cross_entropy_with_logits(logits, target, pos_weight=logits.new_tensor(self.pos_weight))
            return value, {"bce": float(value.detach())}
        return run_steps(self, optimizer, budget, len(labelled), loss, progress)

    # --------------------------------------------------------------------------------------------------- stage 2

    def prompts_from_similarity(self, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """From (N, S, S) stage-1 probabilities: which maps give a prompt (N,) bool, their boxes (N, 4) and peak
        points (N, P, 2) (P = peak_points), all in model-input pixels; a map under the threshold gives none."""
        found = torch.zeros(len(probs), dtype=torch.bool, device=probs.device)
        boxes = torch.zeros(len(probs), 4, device=probs.device)
        points = torch.zeros(len(probs), self.n_points, 2, device=probs.device)
        for n, prob in enumerate(probs):
            region = torch.from_numpy(largest_component((prob > self.threshold).cpu().numpy(), connectivity=2))
            region = region.to(prob.device)
            if region.any():
                found[n] = True
                boxes[n] = mask_box(region)
                if self.n_points:
                    points[n] = peak_points(prob, region, self.n_points)
        return found, boxes, points

    def _sam_masks(self, embeddings: torch.Tensor, image_index: torch.Tensor, boxes: torch.Tensor,
                   points: torch.Tensor | None = None) -> torch.Tensor:
        """(N, S, S) frozen-SAM probabilities for N box (+ positive point) prompts."""
        labels = None
        if points is not None and points.shape[1] > 0:
            labels = torch.ones(points.shape[:2], dtype=torch.int64, device=points.device)
        else:
            points = None
        logits, _ = backbone_masks(self.sam, embeddings, SpatialPrompts(boxes, points, labels), image_index)
        return torch.sigmoid(to_image_size(logits, self.image_size))

    @torch.no_grad()
    def predict(self, images: torch.Tensor, concepts: Sequence[str],
                boxes: torch.Tensor | None = None) -> torch.Tensor:
        """(B, K, S, S) SAM probabilities: prompts from the similarity map (text) or the given boxes (manual, any
        concept name; an all-zero box predicts nothing)."""
        self.eval()
        batch, count, size = images.shape[0], len(concepts), self.image_size
        device = self.device
        images = images.to(device).float()
        if boxes is not None and tuple(boxes.shape) != (batch, count, 4):
            raise ValueError(f"boxes must be (B, K, 4) = ({batch}, {count}, 4), got {tuple(boxes.shape)}")
        embeddings = self.embed(images)
        image_index = torch.arange(batch, device=device).repeat_interleave(count)
        points = None
        if boxes is None:
            probs = self.similarity_probs(images, concepts, embeddings).reshape(batch * count, size, size)
            found, flat, points = self.prompts_from_similarity(probs)
        else:
            flat = boxes.reshape(-1, 4).to(device).float()
            found = flat.abs().sum(-1) > 0
        out = torch.zeros(batch * count, size, size, device=device)
        chosen = torch.nonzero(found).flatten()
        if len(chosen):
            out[chosen] = self._sam_masks(embeddings, image_index[chosen], flat[chosen],
                                          None if points is None else points[chosen])
        return out.reshape(batch, count, size, size)

