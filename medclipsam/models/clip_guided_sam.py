"""CLIP-Guided SAM: vision-language features conditioning SAM's image encoder (adapters) and its prompts.

Manual mode: text + points and/or box. Text-only mode: the word alone (spatial prompts, if any, come from the
similarity map). Every addition to the backbone starts at zero, so an untrained model is exactly its SAM backbone.
The backbone itself stays untouched (`sam`); the prompt encoder and mask decoder that train are copies, so manual
mode can answer prompts with the pristine backbone (`manual_mode="backbone"`): it is never below what it wraps.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medclipsam.data.frame import FrameSettings
from medclipsam.errors import WeightsError
from medclipsam.models.adapters import ConditioningContext, install_adapters
from medclipsam.models.encoder_split import encoder_steps
from medclipsam.models.prompts import SlicePrompts, SpatialPrompts, boxes_from_similarity, points_from_similarity
from medclipsam.models.sam import SamBackbone, build_sam_backbone
from medclipsam.models.sam_layer import backbone_masks, decode, encode_prompts, to_image_size
from medclipsam.models.vision_language import VisionLanguageBackbone, build_vision_language

MANUAL_MODES = ("backbone", "adapted")


@dataclass
class CLIPGuidedSAMConfig:
    """Everything needed to rebuild a model on top of its backbones (stored as JSON next to adapter weights)."""

    sam: str = "litemedsam"
    sam_checkpoint: str | None = None
    vision_language: str = "minilm"
    vision_language_kwargs: dict[str, Any] = field(default_factory=dict)
    adapter_blocks: str | list[int] = "last1"  # "all", "lastN" or explicit block indices
    adapter_ratio: float = 0.2  # bottleneck width / block width (the paper: 0.25; 0.2 keeps ViT-B under 10% trainable)
    adapter_scale: float = 0.5
    similarity_mask_prompt: bool = True  # similarity map -> SAM's dense mask-prompt path
    text_only_prompt: str = "box"  # text-only mode: "box" or "points" derived from the similarity map, or "none"
    text_only_points: int = 3  # how many points "points" takes from the similarity map
    train_prompt_encoder: bool = True
    train_mask_decoder: bool = True
    manual_mode: str = "backbone"  # prompted pairs: the pristine backbone ("backbone") or the adapted path ("adapted")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CLIPGuidedSAMConfig":
        """Inverse of to_dict; unknown keys are an error (a checkpoint from another version)."""
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise WeightsError("model config", f"unknown keys {sorted(unknown)}", "check the checkpoint's medclipsam version")
        config = cls(**data)
        if config.manual_mode not in MANUAL_MODES:
            raise WeightsError("model config", f"manual_mode {config.manual_mode!r} is not one of {MANUAL_MODES}",
                               "set manual_mode to 'backbone' or 'adapted'")
        return config


def resolve_adapter_blocks(spec: str | Sequence[int], n_blocks: int) -> list[int]:
    """Block indices from "all", "lastN" (e.g. "last2") or an explicit list."""
    if isinstance(spec, str):
        if spec == "all":
            return list(range(n_blocks))
        if spec.startswith("last"):
            count = int(spec[4:] or 1)
            if not 1 <= count <= n_blocks:
                raise ValueError(f"adapter_blocks={spec!r}: the encoder has {n_blocks} blocks")
            return list(range(n_blocks - count, n_blocks))
        raise ValueError(f"adapter_blocks={spec!r}: use 'all', 'lastN' or a list of block indices")
    indices = sorted(set(int(i) for i in spec))
    if not indices or indices[0] < 0 or indices[-1] >= n_blocks:
        raise ValueError(f"adapter_blocks={list(spec)}: indices must lie in [0, {n_blocks - 1}]")
    return indices


@dataclass
class ImageFeatures:
    """Concept-independent features of a batch of images, computed once and shared by every concept."""

    trunk: torch.Tensor  # encoder state just before the first adapted block
    sam_embedding: torch.Tensor  # the bare backbone's image embedding (adapters bypassed)
    image_features: torch.Tensor | None  # what the VL backbone reads from the image itself (CLIP), if anything

    def __len__(self) -> int:
        return len(self.trunk)

    def select(self, index: torch.Tensor) -> "ImageFeatures":
        """Features of the images at `index` (repeats allowed)."""
        extra = None if self.image_features is None else self.image_features[index]
        return ImageFeatures(self.trunk[index], self.sam_embedding[index], extra)

    @classmethod
    def cat(cls, parts: Sequence["ImageFeatures"]) -> "ImageFeatures":
        """Concatenate features of several image batches along the batch dimension."""
        extra = None if parts[0].image_features is None else torch.cat([p.image_features for p in parts])
        return cls(torch.cat([p.trunk for p in parts]), torch.cat([p.sam_embedding for p in parts]), extra)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "ImageFeatures":
        """Move (and optionally cast) every tensor."""
        move = lambda t: None if t is None else t.to(device=device, dtype=dtype or t.dtype)  # noqa: E731
        return ImageFeatures(move(self.trunk), move(self.sam_embedding), move(self.image_features))


@dataclass
class SegmentationOutput:
    """Per (image, concept) pair: mask logits at the decoder's resolution, predicted IoU, similarity logits."""

    mask_logits: torch.Tensor  # (N, H, W)
    iou: torch.Tensor  # (N,)
    similarity_logits: torch.Tensor  # (N, h, w)


ABSENT_LOGIT = -20.0  # mask logit of a concept the similarity map did not find (text-only "box" mode)


class FrozenImagePath(nn.Module):
    """The model's SAM encoder on (B, 3, S, S) images in [0, 1], adapters bypassed: (trunk up to the first adapted
    block, bare embedding). Nothing in it trains or depends on a concept."""

    def __init__(self, model: "CLIPGuidedSAM") -> None:
        super().__init__()
        self.sam = model.sam
        self.steps, self.trunk_stop, self.context = model.steps, model.trunk_stop, model.context

    def forward(self, image01: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        trunk = self.steps.run(self.sam.preprocess(image01), 0, self.trunk_stop)
        self.context.enabled = False
        try:
            bare = self.steps.run(trunk, self.trunk_stop)
        finally:
            self.context.enabled = True
        return trunk, bare


class CLIPGuidedSAM(nn.Module):
    """SAM with semantic adapters fed by text embeddings, dense VL features and their similarity map."""

    def __init__(
        self,
        config: CLIPGuidedSAMConfig | None = None,
        sam: SamBackbone | None = None,
        vision_language: VisionLanguageBackbone | None = None,
        frame: FrameSettings | None = None,
    ) -> None:
        super().__init__()
        self.config = config or CLIPGuidedSAMConfig()
        cfg = self.config
        self.sam = sam if sam is not None else build_sam_backbone(cfg.sam, cfg.sam_checkpoint)
        self.sam.requires_grad_(False)
        self.vision_language = (
            vision_language
            if vision_language is not None
            else build_vision_language(cfg.vision_language, **cfg.vision_language_kwargs)
        )
        self.frame = frame or FrameSettings(size=self.sam.image_size)
        # the prompt encoder and decoder that train are copies: `sam` stays the pristine backbone for manual mode
        self.prompt_encoder = self._tuned(self.sam.prompt_encoder, cfg.train_prompt_encoder)
        self.mask_decoder = self._tuned(self.sam.mask_decoder, cfg.train_mask_decoder)
        self.context = ConditioningContext()
        self.steps = encoder_steps(self.sam.image_encoder, self.sam.family)
        self.adapter_indices = resolve_adapter_blocks(cfg.adapter_blocks, len(self.steps.blocks))
        text_dim = self.vision_language.embed_dim
        self.adapters = install_adapters(
            self.steps.blocks, self.adapter_indices, text_dim, text_dim + 1, self.context,
            ratio=cfg.adapter_ratio, scale=cfg.adapter_scale,
        )
        self.trunk_stop = self.steps.step_of_block(self.adapter_indices[0])
        embed_dim = self.sam.embedding_dim
        self.text_to_dense = nn.Linear(text_dim, embed_dim)
        self.similarity_to_dense = nn.Conv2d(embed_dim, embed_dim, kernel_size=1)
        for layer in (self.text_to_dense, self.similarity_to_dense):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.similarity_scale = nn.Parameter(torch.tensor(10.0))
        self.similarity_bias = nn.Parameter(torch.tensor(-2.0))

    @staticmethod
    def _tuned(module: nn.Module, trains: bool) -> nn.Module:
        """A trainable copy of a backbone module, or the frozen module itself when it does not train."""
        return copy.deepcopy(module).requires_grad_(True) if trains else module

    def train(self, mode: bool = True) -> "CLIPGuidedSAM":
        """Train mode for the trainable parts; the frozen encoder stays in eval (its BatchNorms must not drift)."""
        super().train(mode)
        self.sam.image_encoder.eval()
        return self

    @property
    def device(self) -> torch.device:
        """Device of the model's parameters."""
        return next(self.sam.parameters()).device

    @property
    def prompt_frame(self) -> FrameSettings:
        """The frame boxes and clicks are answered in: with `manual_mode="backbone"`, the backbone's own preprocessing
        (each slice resized by its longest side, every slice kept), so manual mode sees exactly what the bare
        backbone sees; else the model's frame."""
        if self.config.manual_mode == "backbone":
            return dataclasses.replace(self.frame, fit="scan", slice_spacing_mm=None)
        return self.frame

    @property
    def image_size(self) -> int:
        """Side S of the (S, S) slices the model takes."""
        return self.sam.image_size

    def encode_concepts(self, concepts: Sequence[str | Sequence[str]]) -> torch.Tensor:
        """(K, D) text embeddings; a concept is a name or a list of synonyms (averaged)."""
        return self.vision_language.encode_concepts(concepts).to(self.device)

    def frozen_image_path(self) -> "FrozenImagePath":
        """The frozen SAM part of `encode` as one module (image -> trunk, bare embedding), for an inference runtime
        to compile."""
        return FrozenImagePath(self)

    def features(self, image01: torch.Tensor, trunk: torch.Tensor, bare: torch.Tensor) -> ImageFeatures:
        """`encode`'s result from the frozen image path's outputs (the VL image features are added here)."""
        return ImageFeatures(trunk=trunk, sam_embedding=bare,
                             image_features=self.vision_language.image_features(image01))

    @torch.no_grad()
    def encode(self, image01: torch.Tensor) -> ImageFeatures:
        """Frozen, concept-independent part: trunk up to the first adapted block, bare embedding, VL image features."""
        return self.features(image01, *self.frozen_image_path()(image01))

    def dense_inputs(self, features: ImageFeatures) -> torch.Tensor:
        """The cached map the pointwise projection turns into dense text-space features."""
        return self.vision_language.dense_inputs(features.sam_embedding, features.image_features)

    def dense_features(self, features: ImageFeatures) -> torch.Tensor:
        """(B, D, h, w) unit-norm dense features in the text space."""
        return self.vision_language.project(self.dense_inputs(features))

    def similarity_logits(self, text: torch.Tensor, dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(calibrated logits scale * cosine + bias, raw cosine), each (N, h, w), for N aligned pairs."""
        cosine = torch.einsum("nd,ndhw->nhw", text.to(dense.dtype), dense)
        return self.similarity_scale * cosine + self.similarity_bias, cosine

    def decode(
        self,
        features: ImageFeatures,
        text: torch.Tensor,
        prompts: SpatialPrompts | None = None,
        dense: torch.Tensor | None = None,
    ) -> SegmentationOutput:
        """Masks for N pairs through the adapted path: `features` and `text` are already aligned per pair (use
        ImageFeatures.select). `dense`: the pairs' dense features when already computed once per image."""
        prompts = prompts or SpatialPrompts()
        dense = self.dense_features(features) if dense is None else dense
        sim_logits, cosine = self.similarity_logits(text, dense)
        found = None
        if prompts.empty:
            prompts, found = self._prompts_from_similarity(sim_logits)
        if found is None or bool(found.all()):
            masks, iou = self._segment_pairs(features, text, dense, sim_logits, cosine, prompts)
            return SegmentationOutput(mask_logits=masks, iou=iou, similarity_logits=sim_logits)
        # concepts the similarity map did not find are absent: they skip the adapted blocks and the decoder
        keep = found.nonzero()[:, 0]
        height, width = self.sam.embedding_size
        masks = sim_logits.new_full((len(text), 4 * height, 4 * width), ABSENT_LOGIT)  # the decoder upsamples 4x
        iou = sim_logits.new_zeros(len(text))
        if len(keep):
            kept_masks, kept_iou = self._segment_pairs(features.select(keep), text[keep], dense[keep], sim_logits[keep],
                                                       cosine[keep], prompts.select(keep))
            masks = masks.index_copy(0, keep, kept_masks.to(masks.dtype))
            iou = iou.index_copy(0, keep, kept_iou.to(iou.dtype))
        return SegmentationOutput(mask_logits=masks, iou=iou, similarity_logits=sim_logits)

    def _segment_pairs(self, features: ImageFeatures, text: torch.Tensor, dense: torch.Tensor,
                       sim_logits: torch.Tensor, cosine: torch.Tensor, prompts: SpatialPrompts
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Adapted encoder head, prompt encoder and decoder for N pairs: mask logits (N, H, W) and IoU (N,)."""
        self.context.set(text, torch.cat([dense, cosine[:, None]], dim=1))
        try:
            embedding = self.steps.run(features.trunk, self.trunk_stop)
        finally:
            self.context.clear()
        sparse, dense_prompt = encode_prompts(self.prompt_encoder, prompts, len(text))
        dense_prompt = dense_prompt + self.text_to_dense(text)[:, :, None, None]
        if self.config.similarity_mask_prompt:
            dense_prompt = dense_prompt + self.similarity_to_dense(self._similarity_mask_embedding(sim_logits))
        return decode(self.prompt_encoder, self.mask_decoder, embedding, sparse, dense_prompt)

    def forward(
        self,
        image01: torch.Tensor,
        concepts: Sequence[str | Sequence[str]],
        boxes: torch.Tensor | None = None,
        points: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
    ) -> SegmentationOutput:
        """Every image (B, 3, S, S) in [0, 1] x every concept (K) through the adapted path; prompts shaped
        (B, K, ...). Outputs (B, K, ...)."""
        batch, count = image01.shape[0], len(concepts)
        features = self.encode(image01)
        text = self.encode_concepts(concepts)
        image_index = torch.arange(batch, device=image01.device).repeat_interleave(count)
        flat = lambda t: None if t is None else t.reshape(batch * count, *t.shape[2:])  # noqa: E731
        prompts = SpatialPrompts(flat(boxes), flat(points), flat(point_labels))
        dense = self.dense_features(features)[image_index]
        out = self.decode(features.select(image_index), text.repeat(batch, 1), prompts, dense=dense)
        unflat = lambda t: t.reshape(batch, count, *t.shape[1:])  # noqa: E731
        return SegmentationOutput(unflat(out.mask_logits), unflat(out.iou), unflat(out.similarity_logits))

    @torch.no_grad()
    def segment(self, features: ImageFeatures, concepts: Sequence[str],
                prompts: SlicePrompts | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Probabilities (B, K, S, S) and confidence (B, K) of K concepts on B encoded slices: text-only without
        prompts; with them, each prompted (slice, concept) pair by `config.manual_mode` (unprompted pairs: 0)."""
        batch, count, size = len(features), len(concepts), self.image_size
        image_index = torch.arange(batch, device=self.device).repeat_interleave(count)
        if prompts is None:
            text = self.encode_concepts(concepts)
            dense = self.dense_features(features)[image_index]  # once per image, shared by its concepts
            out = self.decode(features.select(image_index), text.repeat(batch, 1), None, dense=dense)
            logits, iou = to_image_size(out.mask_logits.float(), size), out.iou.float()
            return torch.sigmoid(logits).view(batch, count, size, size), iou.view(batch, count)
        probs = torch.zeros(batch * count, size, size, device=self.device)
        confidence = torch.zeros(batch * count, device=self.device)
        for pairs, spatial in prompts.groups():
            pairs, spatial = pairs.to(self.device), spatial.to(self.device)
            if self.config.manual_mode == "backbone":
                logits, iou = backbone_masks(self.sam, features.sam_embedding, spatial, image_index[pairs])
            else:
                text = self.encode_concepts(concepts).repeat(batch, 1)[pairs]
                out = self.decode(features.select(image_index[pairs]), text, spatial)
                logits, iou = out.mask_logits, out.iou
            probs[pairs] = torch.sigmoid(to_image_size(logits.float(), size))
            confidence[pairs] = iou.float()
        return probs.view(batch, count, size, size), confidence.view(batch, count)

    def _prompts_from_similarity(self, sim_logits: torch.Tensor) -> tuple[SpatialPrompts, torch.Tensor | None]:
        """Text-only mode: spatial prompts derived from the similarity map, and which pairs it found at all."""
        kind = self.config.text_only_prompt
        if kind == "box":
            boxes, found = boxes_from_similarity(sim_logits, self.sam.image_size)
            return SpatialPrompts(boxes=boxes), found
        if kind == "points":
            return points_from_similarity(sim_logits.detach(), self.config.text_only_points, self.sam.image_size), None
        return SpatialPrompts(), None

    def _similarity_mask_embedding(self, sim_logits: torch.Tensor) -> torch.Tensor:
        size = self.prompt_encoder.mask_input_size
        mask = F.interpolate(sim_logits[:, None], size=size, mode="bilinear", align_corners=False)
        return self.prompt_encoder.mask_downscaling(mask)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Only what training changes (adapters, heads, decoder/prompt encoder if trained, VL projection)."""
        state = {}
        for name, param in self.named_parameters(remove_duplicate=False):
            if param.requires_grad and not name.startswith("sam."):
                state[name] = param.detach()
        return state

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
        """Load adapter-only weights on top of the backbones; any missing or unexpected key is an error."""
        expected = set(self.trainable_state_dict())
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise WeightsError(
                source,
                f"adapter weights do not match this model (missing {missing[:5]}, unexpected {unexpected[:5]})",
                "load it with the config.json saved beside it (same backbones and adapter_blocks)",
            )
        self.load_state_dict(state, strict=False)

    def parameter_counts(self) -> dict[str, int]:
        """Trainable and total parameter counts (the frozen text encoder included in the total)."""
        params = {id(p): p for p in self.parameters()}
        trainable = sum(p.numel() for p in params.values() if p.requires_grad)
        frozen_text = getattr(self.vision_language, "text_encoder", None)
        outside = 0 if frozen_text is None else sum(p.numel() for p in frozen_text.model.parameters())
        return {"trainable": trainable, "total": sum(p.numel() for p in params.values()) + outside}
