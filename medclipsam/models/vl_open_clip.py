"""CLIP / BiomedCLIP through open_clip, frozen: text embeddings and MaskCLIP dense features (no training needed)."""
from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Sequence

import open_clip
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medclipsam.errors import InputError, WeightsError
from medclipsam.models.vl_backbone import VisionLanguageBackbone

BIOMEDCLIP = "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
_OPEN_CLIP_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def _hf_cached_file(repo_id: str, filenames: Sequence[str]) -> str | None:
    """Path of the first of `filenames` already in the local Hugging Face cache for `repo_id`; never downloads."""
    from huggingface_hub import try_to_load_from_cache

    for filename in filenames:
        found = try_to_load_from_cache(repo_id, filename)
        if isinstance(found, str):
            return found
    return None


def _not_cached(source: str, what: str) -> WeightsError:
    from huggingface_hub import constants

    return WeightsError(
        source,
        f"{what} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}); this package never downloads",
        "On a connected machine run `python -c \"import open_clip; open_clip.create_model_and_transforms("
        f"'{source}')\"` and copy its cache here (or set HF_HUB_CACHE), or pass a local checkpoint file",
    )


def _check_open_clip_source(model_name: str, pretrained: str | Path | None) -> None:
    """Fail early, with a specific WeightsError, when the model name, tag, file or cached hub entry is not there."""
    if model_name.startswith("hf-hub:"):
        repo_id = model_name[len("hf-hub:"):]
        if _hf_cached_file(repo_id, ["open_clip_config.json"]) is None:
            raise _not_cached(model_name, "its open_clip_config.json")
        if _hf_cached_file(repo_id, _OPEN_CLIP_WEIGHT_FILES) is None:
            raise _not_cached(model_name, f"its weights ({' or '.join(_OPEN_CLIP_WEIGHT_FILES)})")
        return
    if model_name.startswith("local-dir:"):
        return
    known = open_clip.list_models()
    if model_name.replace("/", "-") not in known:
        close = difflib.get_close_matches(model_name, known, n=5, cutoff=0.5)
        raise WeightsError(
            model_name,
            "is not an open_clip model name",
            f"Close names: {close}" if close else "See open_clip.list_models() for the names it knows",
        )
    if pretrained is None:
        return
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    if isinstance(pretrained, str) and pretrained in tags:
        hub = open_clip.get_pretrained_cfg(model_name, pretrained).get("hf_hub", "")
        repo_id, filename = os.path.split(hub)
        if hub and _hf_cached_file(repo_id, [filename] if filename else _OPEN_CLIP_WEIGHT_FILES) is None:
            raise _not_cached(f"{model_name} / {pretrained} (hf-hub:{repo_id})", "its weights")
        return
    if not Path(pretrained).is_file():
        raise WeightsError(
            pretrained,
            "file not found",
            f"Pass pretrained= an existing open_clip checkpoint file for {model_name!r}, or one of its tags "
            f"whose weights are in your cache: {tags}",
        )


def _value_path_openclip(visual: nn.Module, pixels: Tensor) -> Tensor:
    """Patch tokens (B, N, D) of an open_clip VisionTransformer through the MaskCLIP value path of its last block."""
    if getattr(visual, "attn_pool", None) is not None:
        raise WeightsError(type(visual).__name__, "uses attentional pooling, which has no per-patch text alignment",
                           "Use a CLIP ViT with class-token or average pooling")
    x = visual._embeds(pixels)
    transformer = visual.transformer
    blocks = transformer.resblocks
    if not transformer.batch_first:
        x = x.transpose(0, 1)
    for block in blocks[:-1]:
        x = block(x)
    if not transformer.batch_first:
        x = x.transpose(0, 1)
    last = blocks[-1]
    attn = last.attn
    width = x.shape[-1]
    bias = None if attn.in_proj_bias is None else attn.in_proj_bias[2 * width:]
    values = F.linear(last.ln_1(x), attn.in_proj_weight[2 * width:], bias)
    if isinstance(attn, nn.MultiheadAttention):
        out = attn.out_proj(values)
    else:  # open_clip's own Attention (custom blocks): same path plus its optional head scale and inner norm
        if attn.head_scale is not None:
            b, n, _ = values.shape
            values = (values.view(b, n, attn.num_heads, -1) * attn.head_scale.view(1, 1, -1, 1)).view(b, n, width)
        out = getattr(last, "ln_attn", nn.Identity())(attn.out_proj(attn.ln_inner(values)))
    tokens = visual.ln_post(last.ls_1(out)[:, 1:])
    return tokens if visual.proj is None else tokens @ visual.proj


def _value_path_timm(visual: nn.Module, pixels: Tensor) -> Tensor:
    """Patch tokens (B, N, D) of an open_clip TimmModel over a timm ViT through the MaskCLIP value path."""
    trunk = visual.trunk
    last = trunk.blocks[-1]
    attn = last.attn
    if type(last).__name__ != "Block" or not hasattr(attn, "qkv") or getattr(attn, "gate", None) is not None:
        raise WeightsError(type(trunk).__name__, "is a timm vision tower without a plain ViT last block",
                           "Dense features support timm VisionTransformer towers (e.g. BiomedCLIP's ViT-B/16)")
    x = trunk.norm_pre(trunk.patch_drop(trunk._pos_embed(trunk.patch_embed(pixels))))
    for block in trunk.blocks[:-1]:
        x = block(x)
    values = F.linear(last.norm1(x), *_last_third(attn.qkv))
    tokens = trunk.norm(last.ls1(attn.proj(attn.norm(values))))[:, trunk.num_prefix_tokens:]
    return visual.head(trunk.fc_norm(tokens))


def _last_third(linear: nn.Linear) -> tuple[Tensor, Tensor | None]:
    """Weight and bias rows of a fused qkv Linear that produce v."""
    rows = linear.out_features // 3
    return linear.weight[2 * rows:], None if linear.bias is None else linear.bias[2 * rows:]


class OpenClipBackbone(VisionLanguageBackbone):
    """A frozen open_clip model: an open_clip name with a pretrained tag or local checkpoint file, or an `hf-hub:` id
    already in the local Hugging Face cache (e.g. BiomedCLIP). Nothing is downloaded; keep HF_HUB_OFFLINE=1 set.

    Dense features follow MaskCLIP (Zhou et al., ECCV 2022): in the last vision block each patch token takes only the
    value path (ln_1 -> v projection -> out projection, no query-key attention, no residual or MLP), then ln_post and
    the image projection, the same layers the pooled image embedding goes through, so patch tokens land in the text
    space without training. Chosen over CLIP Surgery's v-v attention because it needs no extra attention pass or
    dual path through several blocks (one ordinary forward) and works on any ViT tower, open_clip's or timm's.
    """

    def __init__(self, model_name: str, pretrained: str | Path | None = None) -> None:
        super().__init__()
        _check_open_clip_source(model_name, pretrained)
        source = str(pretrained) if pretrained is not None and not model_name.startswith("hf-hub:") else model_name
        try:
            model = open_clip.create_model(model_name, pretrained=None if pretrained is None else str(pretrained))
            self.tokenizer = open_clip.get_tokenizer(model_name)
        except Exception as error:  # open_clip raises RuntimeError, OSError, ValueError for bad sources
            raise WeightsError(
                source,
                f"open_clip could not load {model_name!r} from it ({type(error).__name__}: {str(error)[:300]})",
                "Check that the checkpoint was saved from this open_clip model architecture",
            ) from error
        self.model = model.eval().requires_grad_(False)
        self.model_name = model_name
        self.pretrained = None if pretrained is None else str(pretrained)
        preprocess = open_clip.get_model_preprocess_cfg(model)
        size = preprocess["size"]
        self.image_size: tuple[int, int] = (size, size) if isinstance(size, int) else tuple(size)
        self.register_buffer("image_mean", torch.tensor(preprocess["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(preprocess["std"]).view(1, 3, 1, 1), persistent=False)
        with torch.no_grad():
            self.embed_dim = int(self._encode_texts(["x"]).shape[-1])

    def train(self, mode: bool = True) -> "OpenClipBackbone":
        """Switch train/eval mode while the frozen open_clip model stays in eval mode."""
        super().train(mode)
        self.model.eval()
        return self

    def _encode_texts(self, texts: list[str]) -> Tensor:
        return self.model.encode_text(self.tokenizer(texts).to(self.device))

    def image_features(self, image01: Tensor) -> Tensor:
        """MaskCLIP patch features (B, D, H/p, W/p) of a (B, 3, H, W) image in [0, 1], resized to the model's input."""
        if image01 is None:
            raise InputError(None, "OpenClipBackbone needs the image for dense features", "pass image01 (B, 3, H, W)")
        pixels = F.interpolate(image01.float(), size=self.image_size, mode="bilinear", antialias=True)
        pixels = (pixels - self.image_mean) / self.image_std
        visual = self.model.visual
        tokens = _value_path_timm(visual, pixels) if hasattr(visual, "trunk") else _value_path_openclip(visual, pixels)
        grid = _patch_grid(visual)
        dense = tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[-1], *grid)
        return F.normalize(dense.float(), dim=1)

    def dense_inputs(self, sam_embedding: Tensor | None, image_features: Tensor | None) -> Tensor:
        """The MaskCLIP features themselves (SAM's embedding is not used)."""
        if image_features is None:
            raise InputError(None, "OpenClipBackbone needs its image features", "pass image_features(image01)")
        return image_features

    def project(self, inputs: Tensor) -> Tensor:
        """MaskCLIP features are already in the text space: only re-normalised."""
        return F.normalize(inputs.float(), dim=1)


def _patch_grid(visual: nn.Module) -> tuple[int, int]:
    """Patch-grid size (h, w) of an open_clip or timm ViT tower."""
    if hasattr(visual, "trunk"):
        return tuple(visual.trunk.patch_embed.grid_size)
    return tuple(visual.grid_size)
