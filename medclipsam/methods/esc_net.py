"""ESC-Net as a method of the comparison registry: frozen SAM image encoder, a vision-language correlation, and the
ESC blocks and decoder of `medclipsam.models.baselines.esc_net` trained on the labelled slices.

Open vocabulary like the paper: a concept is its text embedding, so any name can be asked for (the model is trained
on the vocabulary given). Text setting only: ESC-Net makes its own (pseudo) prompts and takes none from a user.
Loss: per-class BCE + Dice on the output (the paper trains with BCE; Dice helps the small organs), plus a
class-balanced cross-entropy over [background, classes] on the class logits every Pseudo Prompt Generator reads
(the correlation and each block's class head), weighted `prompt_weight`, so that the pseudo prompts find the organs
early on (our addition: the paper trains end to end with the final loss).
The SAM encoder's embedding of every labelled slice is computed once and cached (float16).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss

from medclipsam.methods.base import vocabulary_targets
from medclipsam.methods.sam_method import SamMethod
from medclipsam.models.baselines.esc_net import ESCNet
from medclipsam.training.loop import TrainBudget, run_steps


def grid_distribution(masks: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(K + 1, g, g) share of each grid cell covered by [background, each of the K (S, S) class masks]."""
    fractions = F.adaptive_avg_pool2d(masks[None].float(), grid)[0]
    return torch.cat([(1.0 - fractions.sum(0, keepdim=True)).clamp(min=0.0), fractions])


def balanced_weights(distributions: torch.Tensor) -> torch.Tensor:
    """Cross-entropy weights (K + 1,) from (N, K + 1, g, g) targets: the inverse square root of each class's pixel
    share, scaled so that a pixel weighs 1 on average (measured on phantoms: without it the small organs' prompts
    stay empty at CPU budgets; the full inverse costs the liver too much)."""
    share = distributions.mean(dim=(0, 2, 3)).clamp(min=1e-4)
    weights = share.rsqrt()
    return weights / (weights * share).sum()


class ESCNetMethod(SamMethod):
    """ESC-Net over a frozen SAM encoder (see the model module for the architecture and our adaptations).

    `grid_size` pools the SAM embedding to a coarser grid before the ESC blocks (None: the encoder's own grid; 32
    instead of LiteMedSAM's 64 x 64: a step of 2 slices x 9 organs took 5 s instead of 18 s on a 2-core CPU).
    `lr` trains the new layers and the vision-language projection, `lr_sam` the prompt encoder and two-way blocks
    that start from SAM. `backbones`: `sam`, `sam_checkpoint`, `vision_language` (default minilm),
    `vision_language_kwargs` and `seed` (also the seed of the new layers), as `SamMethod` takes them.
    """

    name = "esc_net"
    settings = ("text",)

    default_vision_language = "minilm"

    def __init__(self, concepts: Sequence[str], blocks: int = 2, points_per_class: int = 3,
                 prompt_threshold: float = 0.5, grid_size: int | None = None, fusion_hidden: int | None = None,
                 attention_dim: int = 32, decoder_channels: int = 16, guidance_channels: int = 8,
                 upsample_stages: int = 2, prompt_weight: float = 1.0, lr: float = 1e-3, lr_sam: float = 1e-4,
                 weight_decay: float = 1e-4, **backbones: Any) -> None:
        if grid_size is not None and grid_size < 4:
            raise ValueError(f"grid_size must be None or an int >= 4, got {grid_size!r}")

        def build_model(method: SamMethod) -> None:
            method.model = ESCNet(
                method.sam.prompt_encoder, list(method.sam.mask_decoder.transformer.layers),
                text_dim=method.vision_language.embed_dim, image_size=method.image_size, blocks=blocks,
                points_per_class=points_per_class, prompt_threshold=prompt_threshold, fusion_hidden=fusion_hidden,
                attention_dim=attention_dim, decoder_channels=decoder_channels, guidance_channels=guidance_channels,
                upsample_stages=upsample_stages,
            )

        super().__init__(concepts, seeded_parts=build_model, **backbones)
        self.grid_size = grid_size
        self.prompt_weight = float(prompt_weight)
        self.lr, self.lr_sam, self.weight_decay = float(lr), float(lr_sam), float(weight_decay)
        self.dice_loss = DiceLoss(sigmoid=True, batch=True, smooth_nr=1.0, smooth_dr=1.0)

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Frozen SAM embedding (B, C, g, g) of model-size images in [0, 1], pooled to `grid_size` if set."""
        embedding = self.sam.encode(images.to(self.device).float())
        if self.grid_size is not None and embedding.shape[-1] != self.grid_size:
            embedding = F.adaptive_avg_pool2d(embedding, self.grid_size)
        return embedding

    def forward_features(self, embedding: torch.Tensor, images: torch.Tensor, text: torch.Tensor
                         ) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """ESC-Net on cached embeddings: the correlation of the VL dense features with `text`, then the model."""
        vl = self.vision_language
        dense = vl.dense_features(images, embedding)
        if tuple(dense.shape[-2:]) != tuple(embedding.shape[-2:]):
            dense = F.interpolate(dense, size=tuple(embedding.shape[-2:]), mode="bilinear", align_corners=False)
        cosine = vl.similarity(text.to(dense.device, dense.dtype), dense)
        return self.model(embedding, cosine, text.to(embedding.device, embedding.dtype), images)

    def _loss(self, out: dict, targets: torch.Tensor, grid_targets: torch.Tensor, class_weights: torch.Tensor
              ) -> tuple[torch.Tensor, dict[str, float]]:
        logits = out["logits"]
        bce = F.binary_cross_entropy_with_logits(logits, targets)
        dice = self.dice_loss(logits, targets)
        prompts = sum(F.cross_entropy(torch.cat([torch.zeros_like(g[:, :1]), g], dim=1), grid_targets,
                                      weight=class_weights) for g in out["grid_logits"])
        total = bce + dice + self.prompt_weight * prompts
        return total, {"bce": float(bce.detach()), "dice": float(dice.detach()), "prompts": float(prompts.detach())}

    def fit(self, labelled: Sequence[dict], unlabelled: Sequence[dict], budget: TrainBudget,
            progress: Callable[[str], None] | None = None, work_dir: Path | None = None) -> list[dict[str, float]]:
        """Cache the SAM embeddings of the labelled slices, then train for `budget.steps` steps of
        `budget.slices_per_step` slices, every vocabulary concept on every slice (unlabelled slices are not used)."""
        if not labelled:
            raise ValueError("esc_net.fit needs at least one labelled slice item")
        targets = [vocabulary_targets(item, self.concepts, self.name) for item in labelled]
        device = self.device
        torch.manual_seed(budget.seed)
        embeddings = []
        for number, item in enumerate(labelled, 1):
            embeddings.append(self.embed(item["image"][None]).to("cpu", torch.float16))
            if progress and (number % 10 == 0 or number == len(labelled)):
                progress(f"esc_net: cached {number}/{len(labelled)} SAM embeddings")
        grid_targets = [grid_distribution(target, tuple(embeddings[0].shape[-2:])) for target in targets]
        class_weights = balanced_weights(torch.stack(grid_targets)).to(device)
        text = self.vision_language.encode_concepts(self.concepts)
        sam_parameters = {id(p) for p in self.model.sam_parameters()}
        new = [p for p in self.parameters() if p.requires_grad and id(p) not in sam_parameters]
        optimizer = torch.optim.AdamW([{"params": new, "lr": self.lr},
                                       {"params": self.model.sam_parameters(), "lr": self.lr_sam}],
                                      weight_decay=self.weight_decay)

        def loss(indices: list[int], step: int) -> tuple[torch.Tensor, dict[str, float]]:
            embedding = torch.cat([embeddings[i] for i in indices]).to(device, torch.float32)
            images = torch.stack([labelled[i]["image"] for i in indices]).to(device).float()
            out = self.forward_features(embedding, images, text)
            return self._loss(out, torch.stack([targets[i] for i in indices]).to(device),
                              torch.stack([grid_targets[i] for i in indices]).to(device), class_weights)
        return run_steps(self, optimizer, budget, len(labelled), loss, progress)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, concepts: Sequence[str],
                boxes: torch.Tensor | None = None) -> torch.Tensor:
        """(B, K, S, S) sigmoid probabilities for any concept names (the text setting; boxes are refused)."""
        self.refuse_boxes(boxes)
        self.eval()
        images = images.to(self.device).float()
        text = self.vision_language.encode_concepts(list(concepts))
        return torch.sigmoid(self.forward_features(self.embed(images), images, text)["logits"])

    def parameter_counts(self) -> dict[str, int]:
        """Trainable parameters by part: from SAM (prompt encoder, two-way blocks), new ESC layers, VL projection."""
        sam = sum(p.numel() for p in self.model.sam_parameters() if p.requires_grad)
        model = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        vl = sum(p.numel() for p in self.vision_language.parameters() if p.requires_grad)
        return {"from_sam": sam, "new": model - sam, "vision_language": vl}

