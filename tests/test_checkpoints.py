"""Adapter-only checkpoints round-trip to identical outputs, stay small, and fail clearly."""
import pytest
import torch

from medclipsam.errors import OutputExistsError, WeightsError
from medclipsam.models.clip_guided_sam import CLIPGuidedSAM, CLIPGuidedSAMConfig
from medclipsam.training.checkpoints import WEIGHTS_FILE, load_model, save_checkpoint


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = CLIPGuidedSAM(CLIPGuidedSAMConfig(adapter_blocks="last1", train_mask_decoder=False,
                                              train_prompt_encoder=False)).eval()
    with torch.no_grad():
        for param in model.adapters.parameters():
            param.add_(0.01 * torch.randn_like(param))
    folder = save_checkpoint(model, tmp_path / "ckpt")
    assert (folder / WEIGHTS_FILE).stat().st_size < 8 * 2**20
    with pytest.raises(OutputExistsError):
        save_checkpoint(model, folder)
    loaded = load_model(folder)
    image = torch.rand(1, 3, 256, 256)
    with torch.no_grad():
        a = model(image, ["liver"]).mask_logits
        b = loaded(image, ["liver"]).mask_logits
    assert torch.allclose(a, b, atol=1e-5)
    assert loaded.config.adapter_blocks == "last1"


def test_missing_and_truncated_checkpoints(tmp_path):
    with pytest.raises(WeightsError, match="file not found"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text('{"model": {}}')
    (tmp_path / WEIGHTS_FILE).write_bytes(b"\x00\x01truncated")
    with pytest.raises(WeightsError, match="truncated"):
        load_model(tmp_path)
