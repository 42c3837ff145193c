"""ESC-Net baseline: the Pseudo Prompt Generator (softmax, threshold, k-means), the blocks' SAM initialisation, the
text-only restriction, save/load, and training on CT phantoms against the trivial predictors.

The training test uses a four-organ version of the phantom (liver, spleen, both kidneys; the other organs relabelled
background) and a small random SAM ViT (64-pixel input, 2-pixel patches: a 32 x 32 grid), so that ESC-Net trains for
real in seconds on one CPU thread; LiteMedSAM's 64 x 64 x 256 features cost ~1 s a step here.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, TwoWayTransformer
from torch import nn

from helpers_phantoms import SMALL_PHANTOM_FOV_MM, framed_items, phantom_case
from medclipsam.data.concepts import card_from_dict, card_text
from medclipsam.data.frame import FrameSettings
from medclipsam.eval.evaluate import evaluate_method
from medclipsam.models.baselines.esc_net import VisionLanguageFusion, kmeans_points, pseudo_prompts
from medclipsam.models.checkpoints import save_checkpoint
from medclipsam.models.factory import build_method, load_checkpoint
from medclipsam.models.sam import SamBackbone
from medclipsam.training.loop import TrainBudget

SIZE = 64
FRAME = FrameSettings(size=SIZE, field_of_view_mm=SMALL_PHANTOM_FOV_MM)
ORGANS = 4  # label ids 1-4: liver, spleen, right kidney, left kidney
MARGIN = 0.15  # mean Dice ESC-Net must add over the better trivial predictor (measured: 0.64-0.71 vs 0.39)


def micro_sam(seed: int = 0) -> SamBackbone:
    """A random SAM ViT: 64² input, 2-pixel patches (32 x 32 grid), one 32-d block, a one-layer 32-d decoder."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        encoder = ImageEncoderViT(img_size=64, patch_size=2, embed_dim=32, depth=1, num_heads=2, mlp_ratio=2.0,
                                  out_chans=32, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6),
                                  use_rel_pos=True, window_size=0, global_attn_indexes=(0,))
        prompt_encoder = PromptEncoder(embed_dim=32, image_embedding_size=(32, 32), input_image_size=(64, 64),
                                       mask_in_chans=4)
        decoder = MaskDecoder(transformer_dim=32, num_multimask_outputs=3, iou_head_depth=2, iou_head_hidden_dim=32,
                              transformer=TwoWayTransformer(depth=1, embedding_dim=32, mlp_dim=64, num_heads=2))
    return SamBackbone(encoder, prompt_encoder, decoder, name="micro_vit", family="vit", image_size=64).eval()


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The four-organ card, labelled slices (64 px) of phantoms 0-2 and the loaded held-out phantoms 5-7."""
    raw = yaml.safe_load(card_text("phantom"))
    raw["labels"] = {key: value for key, value in raw["labels"].items() if int(key) <= ORGANS}
    card = card_from_dict(raw, "four-organ phantom card")
    root = tmp_path_factory.mktemp("phantoms")
    labelled = [item for seed in (0, 1, 2)
                for item in framed_items(phantom_case(root, seed, organs=ORGANS), card, FRAME, absent_per_slice=ORGANS)]
    return {"card": card, "labelled": labelled,
            "held_out": [phantom_case(root, seed, organs=ORGANS) for seed in (5, 6, 7)]}


def held_out_dice(method, data: dict) -> float:
    """Dice of every organ and held-out phantom (the full 3D pipeline through the predictor), averaged."""
    return float(np.mean([row["dice"] for row in evaluate_method(method, data["held_out"], data["card"])]))


def test_kmeans_points_centres_each_blob_and_handles_small_and_empty_masks():
    masks = torch.zeros(3, 16, 16, dtype=torch.bool)
    masks[0, 1:4, 1:4] = True  # a blob centred at (x, y) = (2, 2)
    masks[0, 10:15, 8:13] = True  # another centred at (10, 12)
    masks[1, 5, 7] = True  # one pixel
    centres, found = kmeans_points(masks, count=2)
    assert found.tolist() == [True, True, False]
    assert sorted(tuple(c) for c in centres[0].tolist()) == [(2.0, 2.0), (10.0, 12.0)]
    assert centres[1].tolist() == [[7.0, 5.0], [7.0, 5.0]]  # a mask smaller than k repeats its pixels
    assert not centres[2].any()


def test_pseudo_prompts_point_inside_the_confident_class_and_pad_absent_ones():
    logits = torch.full((1, 2, 8, 8), -5.0)
    logits[0, 0, 2:5, 4:8] = 5.0  # class 0 confident there; class 1 nowhere above background
    points, labels, masks = pseudo_prompts(logits, threshold=0.5, points_per_class=3, image_size=64)
    assert points.shape == (2, 3, 2) and labels.tolist() == [[1, 1, 1], [-1, -1, -1]]
    assert torch.equal(masks[0], logits[0, 0] > 0) and not masks[1].any()
    grid = (points[0] / 8 - 0.5).round().long()  # back to grid cells (64 px / 8 cells)
    assert all(bool(masks[0, y, x]) for x, y in grid.tolist())


def test_blocks_start_from_sam_and_fusion_starts_as_identity():
    sam = micro_sam()
    method = build_method("esc_net", ["liver", "spleen"], sam=sam, blocks=2, vision_language_kwargs={"hidden": 8})
    layer = sam.mask_decoder.transformer.layers[0]
    for block in method.model.blocks:  # one SAM decoder layer, so both blocks start from it
        assert all(torch.equal(a, b) for a, b in zip(block.sam_block.state_dict().values(),
                                                     layer.state_dict().values()))
    counts = method.parameter_counts()
    assert counts["from_sam"] == 2 * sum(p.numel() for p in layer.parameters()) + \
        sum(p.numel() for p in sam.prompt_encoder.parameters())
    assert method.trainable_parameters() == counts["from_sam"] + counts["new"] + counts["vision_language"]
    assert not any(p.requires_grad for p in method.sam.parameters())  # the encoder stays frozen
    assert all(p.requires_grad for p in method.model.parameters())  # the SAM parts are fine-tuned
    fusion = VisionLanguageFusion(dim=32, text_dim=384, hidden=8, attention_dim=16)
    features = torch.randn(2, 3, 32, 5, 5)
    assert torch.equal(fusion(features, torch.randn(2, 32, 5, 5), torch.randn(3, 384)), features)


def test_esc_net_trains_on_phantoms_and_beats_trivial_predictors(data: dict) -> None:
    card, budget = data["card"], TrainBudget(steps=300, slices_per_step=2, seed=0)
    trivial = {}
    for name in ("empty", "intensity_threshold"):
        method = build_method(name, card.names(), image_size=SIZE)
        method.frame = FRAME
        method.fit(data["labelled"], [], budget)
        trivial[name] = held_out_dice(method, data)
    method = build_method("esc_net", card.names(), sam=micro_sam(), vision_language_kwargs={"hidden": 128},
                          decoder_channels=8, guidance_channels=4, upsample_stages=1, lr=1e-2, lr_sam=1e-2)
    method.frame = FRAME
    history = method.fit(data["labelled"], [], budget)
    first = np.mean([h["total"] for h in history[:10]])
    last = np.mean([h["total"] for h in history[-10:]])
    assert last < 0.5 * first  # measured: 3.19 -> 0.88
    dice = held_out_dice(method, data)
    assert trivial["empty"] == 0.0 and trivial["intensity_threshold"] > 0.2
    # measured through the predictor in the 200 mm frame, 300 steps: ESC-Net 0.71 on one torch thread, 0.64 on two
    # (training seeds 1, 2 on one thread: 0.69, 0.71), intensity threshold 0.39 (liver and right kidney by intensity
    # alone). 150 steps depended on the thread count: 0.60 on two threads, 0.36 on one
    assert dice >= max(trivial.values()) + MARGIN, (dice, trivial)


def test_esc_net_is_text_only_open_vocabulary_and_saves_what_it_trains(tmp_path: Path) -> None:
    options = {"sam": "tiny_vit", "vision_language_kwargs": {"hidden": 8}, "blocks": 1, "seed": 3}
    method = build_method("esc_net", ["liver", "spleen"], **options)
    images = torch.rand(2, 3, 128, 128)
    with pytest.raises(ValueError, match="text setting only"):
        method.predict(images, ["liver"], boxes=torch.zeros(2, 1, 4))
    probs = method.predict(images, ["liver", "aorta", "spleen"])  # a name outside the training vocabulary works
    assert probs.shape == (2, 3, 128, 128) and 0.0 <= float(probs.min()) <= float(probs.max()) <= 1.0
    with torch.no_grad():
        method.model.similarity_bias.fill_(1.5)  # stands in for training
    frame = FrameSettings(size=128, field_of_view_mm=300.0)
    folder = save_checkpoint(method, tmp_path / "esc", "esc_net", method.concepts, options, frame)
    saved = set(load_file(folder / "weights.safetensors"))
    assert not any(key.startswith("sam.") for key in saved)  # the frozen encoder is rebuilt from the options
    assert "model.similarity_bias" in saved and "vision_language.projection.0.weight" in saved
    again = load_checkpoint(folder)
    assert again.frame == frame and again.concepts == ["liver", "spleen"]
    assert torch.equal(again.predict(images, ["liver", "spleen"]), method.predict(images, ["liver", "spleen"]))
    with pytest.raises(ValueError, match="prompt_threshold"):
        build_method("esc_net", ["liver"], sam="tiny_vit", prompt_threshold=1.0)
