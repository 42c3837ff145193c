"""SAM + LoRA baseline (SAMed-style): low-rank adapters on the image encoder's attention, fine-tuned mask decoder,
no vision-language conditioning.

- LoRA comes from `peft` (`LoraConfig` + `inject_adapter_in_model`) on the attention projections of chosen encoder
  blocks: the fused `qkv` Linear of TinyViT (LiteMedSAM) or SAM ViT attention by default; rank and blocks are options
  ("last_stage" by default so that CPU training is feasible, "all" for a GPU).
- Manual setting: SAM's own box prompt, a sigmoid mask per box (jittered boxes are simulated in training).
- Text setting: closed vocabulary. Each class owns learned prompt tokens (2 by default) fed to the decoder as its
  sparse prompt; every class of an image goes through one batched decoder call, and a softmax over
  [background (logit 0), classes] makes the classes compete for each pixel, trained with multi-class Dice + CE as in
  SAMed. The tokens start as SAM's box-prompt embedding of each class's mean box over the labelled slices (a
  pretrained decoder then starts from "the organ usually there"); `token_init="random"` skips that.
- `train_setting` "both" (default) trains one model for both settings: every step has the text loss over the whole
  vocabulary plus a box loss on a `box_fraction` of the present organs; "text" or "manual" train one of them.
- Training caches the frozen encoder trunk (everything before the first LoRA block) once per slice as float16 and
  runs only the LoRA blocks, neck and decoder per step. Unlabelled slices are not used.
- Defaults (lr 1e-3 for LoRA and tokens, 1e-4 for the decoder) suit a pretrained backbone such as LiteMedSAM; a
  randomly initialised test backbone trains from scratch and wants ~10x more.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import peft
import torch
from monai.losses import DiceCELoss
from torch import nn

from medclipsam.methods.base import vocabulary_targets
from medclipsam.methods.sam_method import SamMethod
from medclipsam.models.encoder_split import EncoderSteps, encoder_steps
from medclipsam.models.prompts import SpatialPrompts, mask_box
from medclipsam.models.sam import SamBackbone
from medclipsam.models.sam_layer import decode, encode_prompts, to_image_size
from medclipsam.training.loop import TrainBudget, run_steps
from medclipsam.training.prompt_simulation import jittered_box

TRAIN_SETTINGS = ("text", "manual", "both")
TOKEN_INITS = ("prior_box", "random")


# ------------------------------------------------------------------------------------------------ LoRA placement


def resolve_lora_blocks(spec: str | Sequence[int], encoder: nn.Module, family: str, n_blocks: int) -> list[int]:
    """Encoder block indices (as in `encoder_steps(...).blocks`) from "all", "last_stage", "lastN" or a list.

    "last_stage" is TinyViT's last layer, or for a SAM ViT the blocks after its second-to-last global-attention block
    (ViT-B: blocks 9-11).
    """
    if isinstance(spec, str):
        if spec == "all":
            return list(range(n_blocks))
        if spec == "last_stage":
            if family == "tinyvit":
                count = len(encoder.layers[-1].blocks)
            else:
                global_blocks = [i for i, block in enumerate(encoder.blocks) if block.window_size == 0]
                count = n_blocks - (global_blocks[-2] + 1 if len(global_blocks) >= 2 else 0)
            return list(range(n_blocks - count, n_blocks))
        if spec.startswith("last") and spec[4:].isdigit():
            count = int(spec[4:])
            if not 1 <= count <= n_blocks:
                raise ValueError(f"lora_blocks={spec!r}: the encoder has {n_blocks} attention blocks")
            return list(range(n_blocks - count, n_blocks))
        raise ValueError(f"lora_blocks={spec!r}: use 'all', 'last_stage', 'lastN' or a list of block indices")
    indices = sorted({int(i) for i in spec})
    if not indices or indices[0] < 0 or indices[-1] >= n_blocks:
        raise ValueError(f"lora_blocks={list(spec)}: indices must lie in [0, {n_blocks - 1}]")
    return indices


def lora_target_modules(encoder: nn.Module, blocks: Sequence[nn.Module], targets: Sequence[str]) -> list[str]:
    """Full module names (within `encoder`) of the Linear layers of `blocks` that `targets` name.

    A target is a Linear's name inside a block, whole ("attn.qkv") or by its last parts ("qkv"); one that matches no
    Linear of any chosen block is a ValueError listing the available names.
    """
    if isinstance(targets, str):
        targets = [targets]
    if not targets:
        raise ValueError("lora_targets is empty: name at least one Linear layer of the attention blocks, e.g. 'qkv'")
    names = {id(module): name for name, module in encoder.named_modules()}
    chosen: list[str] = []
    available: set[str] = set()
    matched = {target: False for target in targets}
    for block in blocks:
        prefix = names[id(block)]
        for relative, module in block.named_modules():
            if not isinstance(module, nn.Linear):
                continue
            available.add(relative)
            for target in targets:
                if relative == target or relative.endswith("." + target):
                    matched[target] = True
                    chosen.append(f"{prefix}.{relative}")
    missing = [t for t, hit in matched.items() if not hit]
    if missing:
        raise ValueError(f"lora_targets {missing} match no Linear layer of the chosen encoder blocks; "
                         f"available: {sorted(available)}")
    return sorted(set(chosen))


# ---------------------------------------------------------------------------------------------------------- method


class SamLoRA(SamMethod):
    """SAM with LoRA on encoder attention, a fine-tuned mask decoder and learned prompt tokens per class.

    Text setting: the decoder runs once per class of the vocabulary (its class tokens as the sparse prompt), and the
    class logits with a fixed background logit 0 go through a softmax over [background, classes], trained with
    multi-class Dice + cross-entropy as in SAMed; the probability of a concept is its softmax column, so the closed
    vocabulary competes for every pixel. Manual setting: the box through SAM's prompt encoder, a sigmoid mask per box.
    """

    name = "sam_lora"
    settings = ("text", "manual")

    def __init__(
        self,
        concepts: Sequence[str],
        sam: str | SamBackbone = "litemedsam",
        sam_checkpoint: str | None = None,
        rank: int = 4,
        alpha: float | None = None,
        lora_blocks: str | Sequence[int] = "last_stage",
        lora_targets: Sequence[str] = ("qkv",),
        lora_dropout: float = 0.0,
        class_tokens: int = 2,
        token_init: str = "prior_box",
        train_prompt_encoder: bool = False,
        train_setting: str = "both",
        box_fraction: float = 0.5,
        box_jitter: float = 0.1,
        lr: float = 1e-3,
        lr_decoder: float = 1e-4,
        lr_prompt_encoder: float = 1e-5,
        weight_decay: float = 1e-4,
        seed: int = 0,
    ) -> None:
        super().__init__(concepts, sam, sam_checkpoint, seed=seed)
        if not self.concepts or len(set(self.concepts)) != len(self.concepts):
            raise ValueError(f"sam_lora needs a non-empty list of distinct concepts, got {self.concepts}")
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise ValueError(f"rank must be a positive int, got {rank!r}")
        if not isinstance(class_tokens, int) or class_tokens < 1:
            raise ValueError(f"class_tokens must be a positive int, got {class_tokens!r}")
        if token_init not in TOKEN_INITS:
            raise ValueError(f"token_init={token_init!r}: choose one of {TOKEN_INITS}")
        if train_setting not in TRAIN_SETTINGS:
            raise ValueError(f"train_setting={train_setting!r}: choose one of {TRAIN_SETTINGS}")
        if not 0.0 <= box_fraction <= 1.0:
            raise ValueError(f"box_fraction must lie in [0, 1], got {box_fraction!r}")
        self.train_setting, self.token_init = train_setting, token_init
        self.box_fraction, self.box_jitter = float(box_fraction), float(box_jitter)
        self.lr, self.lr_decoder, self.lr_prompt_encoder = lr, lr_decoder, lr_prompt_encoder
        self.weight_decay = weight_decay

        encoder = self.sam.image_encoder
        steps = encoder_steps(encoder, self.sam.family)
        self.lora_blocks = resolve_lora_blocks(lora_blocks, encoder, self.sam.family, len(steps.blocks))
        self.lora_config = peft.LoraConfig(
            r=rank, lora_alpha=float(rank if alpha is None else alpha), lora_dropout=lora_dropout, bias="none",
            target_modules=lora_target_modules(encoder, [steps.blocks[i] for i in self.lora_blocks], lora_targets),
        )
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            peft.inject_adapter_in_model(self.lora_config, encoder)
            scale = torch.cat([e.weight.detach().flatten() for e in self.sam.prompt_encoder.point_embeddings]).std()
            self.class_tokens = nn.Parameter(
                torch.randn(len(self.concepts), class_tokens, self.sam.embedding_dim) * scale
            )
        for name, parameter in encoder.named_parameters():
            parameter.requires_grad_("lora_" in name)
        self.class_tokens.requires_grad_(train_setting != "manual")  # box-only training never uses them
        # False until the first fit sets the tokens from the data (token_init="prior_box"); saved with the weights
        self.register_buffer("tokens_initialised", torch.tensor(token_init == "random"))
        self.sam.mask_decoder.requires_grad_(True)
        self.sam.prompt_encoder.requires_grad_(train_prompt_encoder)
        # peft swapped the target Linears in place, so the steps are taken from the adapted encoder
        self.steps: EncoderSteps = encoder_steps(encoder, self.sam.family)
        self.trunk_stop = self.steps.step_of_block(self.lora_blocks[0])
        self.text_loss = DiceCELoss(softmax=True, to_onehot_y=True, include_background=False,
                                    smooth_nr=1.0, smooth_dr=1.0)
        self.box_loss = DiceCELoss(sigmoid=True, smooth_nr=1.0, smooth_dr=1.0)
        self.sam.eval()

    # ------------------------------------------------------------------------------------------------ bookkeeping

    def parameter_counts(self) -> dict[str, int]:
        """Trainable parameters by part: LoRA matrices, mask decoder, prompt encoder, class tokens."""
        def count(module: nn.Module) -> int:
            return sum(p.numel() for p in module.parameters() if p.requires_grad)

        lora = sum(p.numel() for n, p in self.sam.image_encoder.named_parameters() if "lora_" in n and p.requires_grad)
        return {"lora": lora, "mask_decoder": count(self.sam.mask_decoder),
                "prompt_encoder": count(self.sam.prompt_encoder),
                "class_tokens": self.class_tokens.numel() if self.class_tokens.requires_grad else 0}

    # ------------------------------------------------------------------------------------------------ forward parts

    def _trunk(self, images: torch.Tensor) -> torch.Tensor:
        return self.steps.run(self.sam.preprocess(images), 0, self.trunk_stop)

    def _head(self, trunk: torch.Tensor) -> torch.Tensor:
        return self.steps.run(trunk, self.trunk_stop)

    def _class_logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(B, 1 + C, S, S) logits over [background (fixed 0), every class of the vocabulary]."""
        batch, classes = embeddings.shape[0], len(self.concepts)
        image_index = torch.arange(batch, device=embeddings.device).repeat_interleave(classes)
        sparse = self.class_tokens.repeat(batch, 1, 1)
        _, dense = encode_prompts(self.sam.prompt_encoder, None, len(image_index))
        logits, _ = decode(self.sam.prompt_encoder, self.sam.mask_decoder, embeddings, sparse, dense, image_index)
        logits = to_image_size(logits, self.image_size).reshape(batch, classes, self.image_size, self.image_size)
        return torch.cat([torch.zeros_like(logits[:, :1]), logits], dim=1)

    def _box_logits(self, embeddings: torch.Tensor, image_index: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """(N, S, S) mask logits for N boxes on images `image_index`."""
        sparse, dense = encode_prompts(self.sam.prompt_encoder, SpatialPrompts(boxes=boxes), len(boxes))
        logits, _ = decode(self.sam.prompt_encoder, self.sam.mask_decoder, embeddings, sparse, dense, image_index)
        return to_image_size(logits, self.image_size)

    # ---------------------------------------------------------------------------------------------------- training

    @torch.no_grad()
    def _init_tokens_from_prior_boxes(self, targets: Sequence[torch.Tensor]) -> None:
        """Start each class's prompt tokens as SAM's box prompt at the class's mean box over the labelled slices.

        A pretrained decoder then already segments the organ most typical of that place, and training refines the
        tokens from there; a class never present keeps its random tokens.
        """
        boxes: dict[int, list[torch.Tensor]] = {}
        for target in targets:
            for k in torch.nonzero(target.flatten(1).amax(1) > 0.5).flatten().tolist():
                boxes.setdefault(k, []).append(mask_box(target[k]))
        for k, found in boxes.items():
            prior = torch.stack(found).mean(0)[None].to(self.device)
            corners, _ = self.sam.prompt_encoder(points=None, boxes=prior, masks=None)  # (1, 2, D)
            count = min(self.class_tokens.shape[1], corners.shape[1])
            self.class_tokens[k, :count] = corners[0, :count]
        self.tokens_initialised.fill_(True)

    def _loss(self, embeddings: torch.Tensor, targets: torch.Tensor, generator: torch.Generator
              ) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss of one step on B slices with vocabulary targets (B, C, S, S)."""
        total = embeddings.new_zeros(())
        terms: dict[str, float] = {}
        if self.train_setting in ("text", "both"):
            with_background = torch.cat([torch.full_like(targets[:, :1], 0.5), targets], dim=1)
            labels = with_background.argmax(dim=1, keepdim=True)
            loss = self.text_loss(self._class_logits(embeddings), labels)
            total, terms["text"] = total + loss, float(loss.detach())
        if self.train_setting in ("manual", "both"):
            present = torch.nonzero(targets.flatten(2).amax(2) > 0.5).tolist()
            if self.train_setting == "both":
                present = [p for p in present if float(torch.rand((), generator=generator)) < self.box_fraction]
            if present:
                image_index = torch.tensor([b for b, _ in present], device=embeddings.device)
                masks = torch.stack([targets[b, k] for b, k in present])
                boxes = torch.stack([jittered_box(m.cpu(), generator, self.box_jitter) for m in masks])
                logits = self._box_logits(embeddings, image_index, boxes.to(embeddings.device))
                loss = self.box_loss(logits[:, None], masks[:, None])
                total, terms["box"] = total + loss, float(loss.detach())
        return total, terms

    def fit(self, labelled: Sequence[dict], unlabelled: Sequence[dict], budget: TrainBudget,
            progress: Callable[[str], None] | None = None, work_dir: Path | None = None) -> list[dict[str, float]]:
        """Cache each labelled slice's frozen trunk, then train LoRA, decoder and class tokens for `budget.steps`.

        Unlabelled slices are not used (a supervised baseline).
        """
        if not labelled:
            raise ValueError("sam_lora.fit needs at least one labelled slice item")
        targets = [vocabulary_targets(item, self.concepts, self.name) for item in labelled]  # checks the vocabulary
        device = self.device
        torch.manual_seed(budget.seed)
        generator = torch.Generator().manual_seed(budget.seed)
        self.eval()
        if not bool(self.tokens_initialised) and self.train_setting != "manual":
            self._init_tokens_from_prior_boxes(targets)
        with torch.no_grad():
            trunks = []
            for number, item in enumerate(labelled, 1):
                trunks.append(self._trunk(item["image"][None].to(device).float()).to("cpu", torch.float16))
                if progress and (number % 10 == 0 or number == len(labelled)):
                    progress(f"sam_lora: cached {number}/{len(labelled)} slice trunks")
        adapted = [p for p in self.sam.image_encoder.parameters() if p.requires_grad]
        adapted += [self.class_tokens] if self.class_tokens.requires_grad else []
        groups = [{"params": adapted, "lr": self.lr},
                  {"params": list(self.sam.mask_decoder.parameters()), "lr": self.lr_decoder}]
        prompt = [p for p in self.sam.prompt_encoder.parameters() if p.requires_grad]
        if prompt:
            groups.append({"params": prompt, "lr": self.lr_prompt_encoder})
        optimizer = torch.optim.AdamW(groups, weight_decay=self.weight_decay)

        def loss(indices: list[int], step: int) -> tuple[torch.Tensor, dict[str, float]]:
            embeddings = self._head(torch.cat([trunks[i] for i in indices]).to(device, torch.float32))
            return self._loss(embeddings, torch.stack([targets[i] for i in indices]).to(device), generator)

        return run_steps(self, optimizer, budget, len(labelled), loss, progress)

    # --------------------------------------------------------------------------------------------------- inference

    @torch.no_grad()
    def predict(self, images: torch.Tensor, concepts: Sequence[str],
                boxes: torch.Tensor | None = None) -> torch.Tensor:
        """(B, K, S, S) probabilities.

        Text (no boxes): the softmax over the whole vocabulary, columns of `concepts` (KeyError for a concept outside
        it). Manual: boxes (B, K, 4) go to SAM's box prompt, any concept name; an all-zero box predicts nothing.
        """
        self.eval()
        batch, count, size = images.shape[0], len(concepts), self.image_size
        device = self.device
        if boxes is None:
            columns = self.class_index(concepts).to(device) + 1
        elif tuple(boxes.shape) != (batch, count, 4):
            raise ValueError(f"boxes must be (B, K, 4) = ({batch}, {count}, 4), got {tuple(boxes.shape)}")
        embeddings = self._head(self._trunk(images.to(device).float()))
        if boxes is None:
            return torch.softmax(self._class_logits(embeddings), dim=1)[:, columns]
        probs = torch.zeros(batch * count, size, size, device=device)
        flat = boxes.reshape(-1, 4).to(device).float()
        given = torch.nonzero(flat.abs().sum(-1) > 0).flatten()
        if len(given):
            image_index = torch.arange(batch, device=device).repeat_interleave(count)[given]
            probs[given] = torch.sigmoid(self._box_logits(embeddings, image_index, flat[given]))
        return probs.reshape(batch, count, size, size)

