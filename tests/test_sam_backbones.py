"""SAM backbones: real LiteMedSAM weights, tiny configurations, and checkpoint errors that say what is wrong."""
from pathlib import Path

import pytest
import torch

from medclipsam.errors import InputError, WeightsError
from medclipsam.models.sam import (
    SAM_BACKBONES,
    SamBackbone,
    build_sam_backbone,
    guess_sam_architecture,
    private_backbone,
    sam_input_size,
)


def _disk_image(size: int = 256, center: tuple[int, int] = (120, 136), radius: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    disk = ((yy - center[0]) ** 2 + (xx - center[1]) ** 2) <= radius**2
    image = torch.where(disk, 0.85, 0.1).float().expand(1, 3, size, size).clone()
    return image, disk


def _box_masks(backbone, image: torch.Tensor, box: list[float]) -> torch.Tensor:
    with torch.no_grad():
        embedding = backbone.encode(image)
        sparse, dense = backbone.prompt_encoder(points=None, boxes=torch.tensor([[box]]), masks=None)
        logits, _ = backbone.mask_decoder(
            image_embeddings=embedding,
            image_pe=backbone.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
    return logits


def test_litemedsam_real_weights_segment_a_boxed_disk():
    backbone = build_sam_backbone()
    assert (backbone.name, backbone.family, backbone.image_size) == ("litemedsam", "tinyvit", 256)
    assert backbone.checkpoint is not None and backbone.checkpoint.endswith("lite_medsam.pth")
    assert backbone.embedding_dim == 256 and backbone.embedding_size == (64, 64)
    image, disk = _disk_image()
    logits = _box_masks(backbone, image, [86.0, 70.0, 186.0, 170.0])  # x0, y0, x1, y1 around the disk
    assert logits.shape == (1, 1, 256, 256)
    mask = logits[0, 0] > 0
    dice = 2 * (mask & disk).sum() / (mask.sum() + disk.sum())
    assert dice >= 0.9


def test_preprocess_follows_each_family():
    image = torch.rand(2, 3, 128, 128)
    tinyvit = build_sam_backbone("tiny_tinyvit")
    assert torch.equal(tinyvit.preprocess(image), image)
    vit = build_sam_backbone("tiny_vit")
    mean = torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1)
    std = torch.tensor([58.395, 57.12, 57.375]).view(1, 3, 1, 1)
    assert torch.allclose(vit.preprocess(image), (image * 255 - mean) / std)
    with pytest.raises(InputError, match="128"):
        vit.preprocess(torch.rand(1, 3, 64, 64))


@pytest.mark.parametrize(
    ("name", "channels", "grid"), [("tiny_vit", 32, (8, 8)), ("tiny_tinyvit", 256, (64, 64))]
)
def test_tiny_backbones_encode_to_their_declared_grid(name, channels, grid):
    backbone = build_sam_backbone(name)
    assert backbone.embedding_dim == channels and backbone.embedding_size == grid
    with torch.no_grad():
        embedding = backbone.encode(torch.rand(2, 3, backbone.image_size, backbone.image_size))
    assert embedding.shape == (2, channels, *grid)


def test_tiny_vit_checkpoint_round_trip_gives_identical_outputs(tmp_path: Path):
    trained = build_sam_backbone("tiny_vit")
    with torch.no_grad():
        for parameter in trained.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    path = tmp_path / "tiny_vit.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in trained.state_dict().items()}}, path)

    reloaded = build_sam_backbone("tiny_vit", checkpoint=path)
    fresh = build_sam_backbone("tiny_vit")
    image, _ = _disk_image(size=128, center=(64, 64), radius=20)
    box = [40.0, 40.0, 88.0, 88.0]
    assert reloaded.checkpoint == str(path)
    assert torch.equal(_box_masks(reloaded, image, box), _box_masks(trained, image, box))
    assert not torch.allclose(_box_masks(fresh, image, box), _box_masks(trained, image, box))


def test_missing_checkpoint_names_file_and_expected_weights(tmp_path: Path):
    missing = tmp_path / "nowhere" / "lite.pth"
    with pytest.raises(WeightsError) as error:
        build_sam_backbone("litemedsam", checkpoint=missing)
    message = str(error.value)
    assert str(missing) in message and "file not found" in message
    assert "lite_medsam.pth" in message and "checkpoint=" in message


def test_garbage_file_is_not_a_checkpoint(tmp_path: Path):
    garbage = tmp_path / "sam_vit_b_01ec64.pth"
    garbage.write_bytes(b"this is not a pickle or a zip archive" * 10)
    with pytest.raises(WeightsError) as error:
        build_sam_backbone("tiny_vit", checkpoint=garbage)
    assert str(garbage) in str(error.value) and "not a PyTorch checkpoint" in str(error.value)


def test_wrong_architecture_lists_keys_and_suggests_the_right_backbone(tmp_path: Path):
    path = tmp_path / "from_tiny_vit.pth"
    torch.save(build_sam_backbone("tiny_vit").state_dict(), path)
    with pytest.raises(WeightsError) as error:
        build_sam_backbone("tiny_tinyvit", checkpoint=path)
    message = str(error.value)
    assert str(path) in message and "does not fit backbone 'tiny_tinyvit'" in message
    assert "missing (" in message and "image_encoder.patch_embed.seq.0.c.weight" in message
    assert "unexpected (" in message and "shape mismatch (" in message
    assert "build_sam_backbone('tiny_vit'" in message


def test_architecture_guess_from_patch_embedding_width():
    def patch(width: int) -> dict:
        return {"image_encoder.patch_embed.proj.weight": torch.zeros(width, 3, 16, 16)}

    assert guess_sam_architecture(patch(1024)) == ("vit_l",)
    assert guess_sam_architecture(patch(768)) == ("vit_b", "medsam")
    assert guess_sam_architecture(patch(1280)) == ("vit_h",)
    assert guess_sam_architecture({"encoder.weight": torch.zeros(1)}) == ()


@pytest.mark.parametrize(("name", "expected_file"), [("vit_b", "sam_vit_b_01ec64.pth"), ("medsam", "medsam_vit_b.pth")])
def test_sam_vit_without_checkpoint_says_which_file(name, expected_file):
    with pytest.raises(WeightsError) as error:
        build_sam_backbone(name)
    assert expected_file in str(error.value) and "cannot download" in str(error.value)


def test_unknown_backbone_name_suggests_close_names():
    assert {"litemedsam", "vit_b", "vit_l", "vit_h", "medsam", "tiny_vit", "tiny_tinyvit"} <= set(SAM_BACKBONES)
    with pytest.raises(WeightsError, match="'vit_b'"):
        build_sam_backbone("vit-b")


def test_private_backbone_is_a_copy_the_caller_never_sees_change():
    shared = build_sam_backbone("tiny_vit")
    before = {key: value.clone() for key, value in shared.state_dict().items()}
    private = private_backbone(shared)
    assert isinstance(private, SamBackbone) and private is not shared
    with torch.no_grad():
        for parameter in private.parameters():
            parameter.add_(1.0)
    assert all(torch.equal(value, shared.state_dict()[key]) for key, value in before.items())
    by_name = private_backbone("tiny_vit")
    assert all(torch.equal(value, by_name.state_dict()[key]) for key, value in before.items())
    with pytest.raises(ValueError, match="sam_checkpoint is only for a backbone given by name"):
        private_backbone(shared, "tiny_vit.pth")


def test_sam_input_size_reads_the_registered_backbone():
    assert sam_input_size("tiny_vit") == sam_input_size("tiny_tinyvit") == 128
    assert sam_input_size("litemedsam") == 256
    with pytest.raises(WeightsError, match="unknown SAM backbone"):
        sam_input_size("vit-b")
