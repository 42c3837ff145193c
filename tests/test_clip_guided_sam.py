"""CLIP-Guided SAM: zero-initialised additions leave the backbone's output unchanged; adapter state round-trips."""
import pytest
import torch

from medclipsam.errors import WeightsError
from medclipsam.models.clip_guided_sam import CLIPGuidedSAM, CLIPGuidedSAMConfig, resolve_adapter_blocks
from medclipsam.models.sam import build_sam_backbone


@pytest.fixture(scope="module")
def model_and_backbone():
    torch.manual_seed(0)
    model = CLIPGuidedSAM(CLIPGuidedSAMConfig(adapter_blocks="last2")).eval()
    return model, build_sam_backbone("litemedsam").eval()


def test_untrained_model_with_box_equals_litemedsam(model_and_backbone):
    model, backbone = model_and_backbone
    image = torch.zeros(1, 3, 256, 256)
    image[:, :, 80:160, 90:170] = 0.8
    box = torch.tensor([[[85.0, 75.0, 175.0, 165.0]]])
    with torch.no_grad():
        ours = model(image, ["liver"], boxes=box).mask_logits[0, 0]
        sparse, dense = backbone.prompt_encoder(points=None, boxes=box[0], masks=None)
        ref, _ = backbone.mask_decoder(backbone.encode(image), backbone.prompt_encoder.get_dense_pe(), sparse, dense,
                                       multimask_output=False)
    assert torch.allclose(ours, ref[0, 0], atol=1e-4)
    with torch.no_grad():
        next(iter(model.adapters.values()))["multimodal"].fc2.weight.fill_(0.01)
        changed = model(image, ["liver"], boxes=box).mask_logits[0, 0]
        next(iter(model.adapters.values()))["multimodal"].fc2.weight.zero_()
    assert not torch.allclose(changed, ref[0, 0], atol=1e-4)


def test_trainable_state_is_small_and_round_trips(model_and_backbone):
    model, _ = model_and_backbone
    state = model.trainable_state_dict()
    assert not any(name.startswith("sam.") for name in state)  # the backbone stays pristine
    assert any(name.startswith("mask_decoder.") for name in state)  # the tuned copy trains
    counts = model.parameter_counts()
    assert 0 < counts["trainable"] < counts["total"]
    model.load_trainable_state_dict(state)
    with pytest.raises(WeightsError, match="do not match"):
        model.load_trainable_state_dict({k: v for k, v in list(state.items())[1:]})


def test_adapter_block_spec():
    assert resolve_adapter_blocks("all", 4) == [0, 1, 2, 3]
    assert resolve_adapter_blocks("last2", 10) == [8, 9]
    assert resolve_adapter_blocks([3, 1, 3], 10) == [1, 3]
    with pytest.raises(ValueError, match="10 blocks"):
        resolve_adapter_blocks("last11", 10)


def test_text_only_outputs_per_image_and_concept(model_and_backbone):
    model, _ = model_and_backbone
    image = torch.rand(2, 3, 256, 256)
    with torch.no_grad():
        out = model(image, ["liver", ["left kidney", "kidney_left"], "spleen"])
    assert out.mask_logits.shape == (2, 3, 256, 256)
    assert out.iou.shape == (2, 3)
    assert out.similarity_logits.shape == (2, 3, 64, 64)
    # the similarity map depends on the word: different concepts give different maps on the same image
    assert not torch.allclose(out.similarity_logits[0, 0], out.similarity_logits[0, 2])


def test_vit_b_with_adapters_in_every_block_trains_under_ten_percent():
    from segment_anything import sam_model_registry

    from medclipsam.models.sam import SamBackbone

    sam = sam_model_registry["vit_b"](checkpoint=None)  # the real architecture; weights do not change the counts
    backbone = SamBackbone(sam.image_encoder, sam.prompt_encoder, sam.mask_decoder, name="vit_b", family="vit",
                           image_size=1024)
    model = CLIPGuidedSAM(CLIPGuidedSAMConfig(sam="vit_b", adapter_blocks="all"), sam=backbone)
    counts = model.parameter_counts()
    assert len(model.adapters) == 12
    assert counts["total"] > 110e6  # SAM ViT-B (~94M) + MiniLM text encoder (~23M) are counted
    assert counts["trainable"] <= 0.10 * counts["total"]
