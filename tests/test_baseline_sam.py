"""SAM-based baselines: "sam_lora" (SAMed-style LoRA + decoder) and "two_stage" (MedCLIP-SAM style).

Both are trained on the even slices of one small phantom and scored on its odd slices against two trivial predictors:
the empty mask (Dice 0) and an intensity threshold per concept (the 5th-95th percentile of the concept's labelled
pixel intensities). Dice is pooled over the held-out slices per concept, then averaged over the concepts present.
sam_lora trains from scratch on a small random SAM ViT built here (LiteMedSAM training costs ~10 s a step on CPU);
two_stage uses the real LiteMedSAM weights, which its frozen second stage needs.
"""
from __future__ import annotations

from functools import partial

import peft
import pytest
import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, TwoWayTransformer
from torch import nn

from helpers_phantoms import framed_items, phantom_case
from medclipsam.data.concepts import load_card
from medclipsam.data.frame import FrameSettings
from medclipsam.errors import WeightsError
from medclipsam.methods.two_stage import peak_points
from medclipsam.models.factory import build_method
from medclipsam.models.prompts import largest_component, mask_box
from medclipsam.models.sam import SamBackbone, build_sam_backbone
from medclipsam.training.loop import TrainBudget

CARD = load_card("phantom")
NAMES = [CARD.concepts[i].name for i in sorted(CARD.concepts)]


# ------------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    """A full-size phantom (384 mm across, coarse voxels): it fills the default 400 mm frame."""
    return phantom_case(tmp_path_factory.mktemp("phantom"), 1, spacing=(6.0, 6.0, 12.0))


def split(case, size: int) -> tuple[list[dict], list[dict]]:
    """Labelled slices of the case in the default frame at `size` pixels: even positions train, odd are held out."""
    items = framed_items(case, CARD, FrameSettings(size=size), empty_ratio=0.0, absent_per_slice=1, seed=0)
    return items[0::2], items[1::2]


def small_vit(seed: int = 0) -> SamBackbone:
    """A small random SAM ViT: 128² input, 8-pixel patches (a 16 x 16 grid, finer than the registered tiny_vit's
    8 x 8, which cannot resolve the phantom's kidneys), 2 blocks, a 1-layer 32-d decoder."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        encoder = ImageEncoderViT(
            img_size=128, patch_size=8, embed_dim=64, depth=2, num_heads=2, mlp_ratio=2.0, out_chans=32,
            qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6), use_rel_pos=True, window_size=8,
            global_attn_indexes=(1,),
        )
        prompt_encoder = PromptEncoder(embed_dim=32, image_embedding_size=(16, 16), input_image_size=(128, 128),
                                       mask_in_chans=4)
        decoder = MaskDecoder(transformer_dim=32, num_multimask_outputs=3, iou_head_depth=2, iou_head_hidden_dim=32,
                              transformer=TwoWayTransformer(depth=1, embedding_dim=32, mlp_dim=64, num_heads=2))
    return SamBackbone(encoder, prompt_encoder, decoder, name="small_vit", family="vit", image_size=128).eval()


# ------------------------------------------------------------------------------------------------------- scoring


def truth(item: dict, names=NAMES) -> torch.Tensor:
    """(K, S, S) bool masks of an item for `names` (a concept the item does not list is absent)."""
    own = dict(zip(item["concepts"], item["masks"]))
    zero = torch.zeros(item["image"].shape[-2:])
    return torch.stack([own.get(name, zero) for name in names]) > 0.5


def pooled_dice(predictions: list[torch.Tensor], items: list[dict], names=NAMES) -> float:
    """Mean over concepts present in `items` of the Dice pooled over all slices (false positives count too)."""
    scores = []
    for k in range(len(names)):
        truths = [truth(item, names)[k] for item in items]
        if not any(t.any() for t in truths):
            continue
        overlap = sum(float((p[k] & t).sum()) for p, t in zip(predictions, truths))
        total = sum(float(p[k].sum() + t.sum()) for p, t in zip(predictions, truths))
        scores.append(2 * overlap / total if total else 1.0)
    return sum(scores) / len(scores)


def oracle_boxes(items: list[dict], names=NAMES) -> torch.Tensor:
    """(B, K, 4) tight boxes of the truth; all-zero for absent concepts (no prompt)."""
    return torch.stack([mask_box(truth(item, names)) for item in items])


def intensity_threshold(labelled: list[dict], items: list[dict], boxes: torch.Tensor | None = None) -> list:
    """Trivial predictor: a pixel is concept k when its intensity lies in k's 5th-95th labelled percentile range
    (inside k's box when boxes are given)."""
    ranges = []
    for k in range(len(NAMES)):
        values = torch.cat([item["image"][0][truth(item)[k]] for item in labelled])
        ranges.append(torch.quantile(values, torch.tensor([0.05, 0.95])) if len(values) else None)
    predictions = []
    for b, item in enumerate(items):
        image = item["image"][0]
        masks = torch.zeros(len(NAMES), *image.shape, dtype=torch.bool)
        for k, bounds in enumerate(ranges):
            if bounds is not None:
                masks[k] = (image >= bounds[0]) & (image <= bounds[1])
            if boxes is not None:
                x0, y0, x1, y1 = (int(v) for v in boxes[b, k].round())
                inside = torch.zeros_like(masks[k])
                if boxes[b, k].abs().sum() > 0:
                    inside[y0:y1 + 1, x0:x1 + 1] = True
                masks[k] &= inside
        predictions.append(masks)
    return predictions


def predicted_masks(method, items: list[dict], boxes: torch.Tensor | None = None) -> list[torch.Tensor]:
    images = torch.stack([item["image"] for item in items])
    return list(method.predict(images, NAMES, boxes) > 0.5)


# ------------------------------------------------------------------------------------------------------ sam_lora


def test_sam_lora_places_lora_on_the_last_stage_and_counts_match_peft():
    method = build_method("sam_lora", NAMES, sam="litemedsam")
    adapted = sorted(n for n, m in method.sam.image_encoder.named_modules() if isinstance(m, peft.tuners.lora.Linear))
    assert adapted == ["layers.3.blocks.0.attn.qkv", "layers.3.blocks.1.attn.qkv"]
    fresh = build_sam_backbone("litemedsam").image_encoder
    peft_trainable, _ = peft.get_peft_model(fresh, method.lora_config).get_nb_trainable_parameters()
    counts = method.parameter_counts()
    assert counts["lora"] == peft_trainable == 2 * 4 * (320 + 960)  # rank 4 on two 320 -> 960 qkv projections
    decoder = sum(p.numel() for p in method.sam.mask_decoder.parameters())
    assert counts == {"lora": peft_trainable, "mask_decoder": decoder, "prompt_encoder": 0,
                      "class_tokens": len(NAMES) * 2 * 256}
    assert method.trainable_parameters() == peft_trainable + decoder + len(NAMES) * 2 * 256
    frozen = [n for n, p in method.sam.image_encoder.named_parameters() if p.requires_grad and "lora_" not in n]
    assert frozen == []

    everywhere = build_method("sam_lora", NAMES, sam="tiny_tinyvit", lora_blocks="all", rank=2,
                              lora_targets=("qkv", "proj"), train_prompt_encoder=True)
    reference = peft.get_peft_model(build_sam_backbone("tiny_tinyvit").image_encoder, everywhere.lora_config)
    assert everywhere.parameter_counts()["lora"] == reference.get_nb_trainable_parameters()[0]
    assert everywhere.parameter_counts()["prompt_encoder"] > 0
    # LoRA's B matrices start at zero: before training the adapted encoder computes exactly the backbone's embedding
    image = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        assert torch.equal(everywhere.sam.encode(image), build_sam_backbone("tiny_tinyvit").encode(image))


def test_sam_lora_trains_on_phantom_slices_and_beats_trivial_predictors(phantom):
    labelled, held_out = split(phantom, 128)
    method = build_method("sam_lora", NAMES, sam=small_vit(), train_setting="both", lr=1e-2, lr_decoder=5e-3)
    history = method.fit(labelled, [], TrainBudget(steps=300, slices_per_step=1, seed=0))
    first = sum(h["total"] for h in history[:20]) / 20
    last = sum(h["total"] for h in history[-20:]) / 20
    assert last < 0.6 * first  # measured: 3.20 -> 1.01 (before the physical frame: 3.23 -> 1.33)

    boxes = oracle_boxes(held_out)
    text = pooled_dice(predicted_masks(method, held_out), held_out)
    manual = pooled_dice(predicted_masks(method, held_out, boxes), held_out)
    empty = pooled_dice([torch.zeros(len(NAMES), 128, 128, dtype=torch.bool)] * len(held_out), held_out)
    intensity = pooled_dice(intensity_threshold(labelled, held_out), held_out)
    assert empty == 0.0
    # measured in the 400 mm frame: text 0.47, manual 0.50, intensity threshold 0.19 (before the physical frame: 0.45,
    # 0.45, 0.21; other seeds: text 0.39-0.44, manual 0.43-0.53). A box-restricted intensity threshold (0.90) is NOT
    # beaten by this from-scratch tiny SAM.
    assert text > intensity + 0.1
    assert manual > intensity + 0.1


def test_sam_lora_same_seed_gives_identical_predictions(phantom):
    labelled, held_out = split(phantom, 128)
    vocabulary = ["liver", "spleen"]  # the tiny TinyViT's decoder is slow (256-d at 64 x 64): few pairs
    keep = [{**i, "concepts": [c for c in i["concepts"] if c in vocabulary],
             "masks": i["masks"][[n for n, c in enumerate(i["concepts"]) if c in vocabulary]]} for i in labelled[3:5]]
    images = torch.stack([i["image"] for i in held_out[3:4]])
    boxes = oracle_boxes(held_out[3:4], vocabulary)

    def run(init_seed: int, budget_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        method = build_method("sam_lora", vocabulary, sam="tiny_tinyvit", seed=init_seed, lr=1e-2)
        method.fit(keep, [], TrainBudget(steps=1, slices_per_step=1, seed=budget_seed))
        return method.predict(images, vocabulary), method.predict(images, vocabulary, boxes)

    text_a, manual_a = run(0, 0)
    text_b, manual_b = run(0, 0)
    assert torch.equal(text_a, text_b) and torch.equal(manual_a, manual_b)
    text_c, _ = run(1, 1)
    assert not torch.equal(text_a, text_c)
    # text probabilities are a softmax over [background, vocabulary]: they never sum past 1 at a pixel
    assert float(text_a.sum(dim=1).max()) <= 1.0 + 1e-5


def test_sam_lora_rejects_bad_options_and_unknown_concepts(phantom):
    with pytest.raises(ValueError, match=r"lora_targets \['qvk'\].*available: \['attn.proj', 'attn.qkv'"):
        build_method("sam_lora", NAMES, sam="tiny_vit", lora_targets=("qvk",))
    with pytest.raises(ValueError, match="lora_blocks='middle'"):
        build_method("sam_lora", NAMES, sam="tiny_vit", lora_blocks="middle")
    with pytest.raises(ValueError, match="the encoder has 2 attention blocks"):
        build_method("sam_lora", NAMES, sam="tiny_vit", lora_blocks="last5")
    with pytest.raises(ValueError, match="indices must lie in"):
        build_method("sam_lora", NAMES, sam="tiny_vit", lora_blocks=[7])
    with pytest.raises(ValueError, match="rank must be a positive int"):
        build_method("sam_lora", NAMES, sam="tiny_vit", rank=0)
    with pytest.raises(ValueError, match="train_setting"):
        build_method("sam_lora", NAMES, sam="tiny_vit", train_setting="points")
    with pytest.raises(WeightsError, match="unknown SAM backbone"):
        build_method("sam_lora", NAMES, sam="tinyvit")
    method = build_method("sam_lora", ["liver", "spleen"], sam="tiny_vit")
    with pytest.raises(KeyError, match=r"concepts \['kidney'\] are not in its vocabulary"):
        method.predict(torch.rand(1, 3, 128, 128), ["liver", "kidney"])
    labelled, _ = split(phantom, 128)
    with pytest.raises(KeyError, match="training slice concepts"):
        method.fit(labelled[:1], [], TrainBudget(steps=1, slices_per_step=1))


# ----------------------------------------------------------------------------------------------------- two_stage


def test_two_stage_with_litemedsam_beats_trivial_predictors(phantom):
    labelled, held_out = split(phantom, 256)
    labelled, held_out = [labelled[i] for i in (1, 3, 4)], held_out[2:4]  # slices 5, 9, 11 train; 8, 10 scored
    method = build_method("two_stage", NAMES, lr=1e-2, vision_language_kwargs={"hidden": 64})
    projection = sum(p.numel() for p in method.vision_language.projection.parameters())
    assert method.trainable_parameters() == projection + 2  # the projection, similarity scale and bias; no adapters
    sam_before = {k: v.clone() for k, v in method.sam.state_dict().items()}

    boxes = oracle_boxes(held_out)
    manual = pooled_dice(predicted_masks(method, held_out, boxes), held_out)  # stage 1 plays no part: no training
    history = method.fit(labelled, [], TrainBudget(steps=60, slices_per_step=1, seed=0))
    assert sum(h["total"] for h in history[-10:]) < 0.5 * sum(h["total"] for h in history[:10])
    assert all(torch.equal(v, method.sam.state_dict()[k]) for k, v in sam_before.items())  # SAM stays frozen
    text = pooled_dice(predicted_masks(method, held_out), held_out)

    intensity = pooled_dice(intensity_threshold(labelled, held_out), held_out)
    # measured in the 400 mm frame: manual (LiteMedSAM + oracle boxes) 0.65, text 0.39, intensity threshold 0.22;
    # loss 0.14 -> 0.029 (before the physical frame: 0.68, 0.41 (seeds 1, 2: 0.41, 0.49), 0.22; 0.13 -> 0.023). A
    # box-restricted intensity threshold (0.87) beats LiteMedSAM's boxes on these synthetic organs; it is not asserted.
    assert manual > intensity + 0.3
    assert text > intensity + 0.1


def test_two_stage_prompts_come_from_the_largest_confident_region():
    method = build_method("two_stage", ["liver"], sam="tiny_vit", vision_language_kwargs={"hidden": 8},
                          peak_points=2)
    probs = torch.zeros(2, 128, 128)
    probs[0, 10:20, 30:60] = 0.9  # the larger region
    probs[0, 80:84, 80:84] = 0.95  # smaller, though more confident
    probs[0, 12, 40] = 0.99
    probs[1] = 0.4  # below the threshold everywhere
    found, boxes, points = method.prompts_from_similarity(probs)
    assert found.tolist() == [True, False]
    assert boxes[0].tolist() == [30.0, 10.0, 59.0, 19.0]
    assert points[0, 0].tolist() == [40.0, 12.0]  # the peak first
    assert 30 <= points[0, 1, 0] <= 59 and 10 <= points[0, 1, 1] <= 19  # then another pixel of the region
    region = torch.from_numpy(largest_component((probs[0] > 0.5).numpy(), connectivity=2))
    assert int(region.sum()) == 300 and not region[80:84, 80:84].any()
    assert peak_points(probs[0], region, 3).shape == (3, 2)

    # a concept whose similarity never reaches the threshold predicts an empty mask
    with torch.no_grad():
        method.similarity_bias.fill_(-100.0)
    assert not method.predict(torch.rand(2, 3, 128, 128), ["liver", "spleen"]).any()


def test_two_stage_same_seed_gives_identical_predictions(phantom):
    labelled, held_out = split(phantom, 128)
    images = torch.stack([i["image"] for i in held_out[:3]])

    def run(seed: int) -> torch.Tensor:
        method = build_method("two_stage", NAMES, sam="tiny_vit", seed=seed, vision_language_kwargs={"hidden": 16})
        method.fit(labelled, [], TrainBudget(steps=5, slices_per_step=2, seed=seed))
        return method.similarity_probs(images, NAMES)

    first, again, other = run(0), run(0), run(1)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_two_stage_with_open_clip_has_nothing_to_train():
    # random ViT-S-32 weights (none are installed): this checks the training-free path, not CLIP's quality
    method = build_method("two_stage", ["liver", "spleen"], sam="tiny_vit", vision_language="open_clip",
                          vision_language_kwargs={"model_name": "ViT-S-32"})
    assert method.trainable_parameters() == 0
    assert method.fit([], [], TrainBudget(steps=5)) == []
    images = torch.rand(2, 3, 128, 128)
    probs = method.similarity_probs(images, ["liver", "spleen"])  # MaskCLIP features of the image itself
    assert probs.shape == (2, 2, 128, 128)
    assert not torch.equal(probs[0], probs[1])
