"""The open_clip path end to end: a tiny open_clip checkpoint saved and loaded, CLIP-Guided SAM trained 2 steps on
framed phantom slices, its checkpoint written as it trains, reloaded on top of the backbones, and used for inference
with identical outputs."""
import open_clip
import torch

from conftest import TINY
from medclipsam.data.concepts import load_card
from medclipsam.data.frame import FrameSettings
from medclipsam.data.phantom import make_phantom
from medclipsam.data.slices import frame_case, load_case, slice_items
from medclipsam.models.clip_guided_sam import CLIPGuidedSAMConfig
from medclipsam.models.factory import build_method, load_checkpoint
from medclipsam.training.loop import TrainBudget


def test_open_clip_train_save_reload_infer(tmp_path, tiny_open_clip_configs):
    clip_file = tmp_path / "tiny_clip.pt"
    torch.manual_seed(1)
    torch.save(open_clip.create_model(TINY).state_dict(), clip_file)
    make_phantom(2, shape=(64, 64, 16)).to_nifti(tmp_path / "ct.nii.gz", tmp_path / "lab.nii.gz")
    case = load_case({"image": str(tmp_path / "ct.nii.gz"), "label": str(tmp_path / "lab.nii.gz")})
    card = load_card("phantom")
    frame = FrameSettings(size=128)
    items = slice_items(frame_case(case, frame), card, empty_ratio=0, absent_per_slice=2, slice_step=5)[:2]
    config = CLIPGuidedSAMConfig(sam="tiny_vit", vision_language="open_clip", adapter_blocks="last1",
                                 vision_language_kwargs={"model_name": TINY, "pretrained": str(clip_file)})
    torch.manual_seed(0)
    method = build_method("clip_guided_sam", card.names(), model_options=config.to_dict(),
                          train_options={"similarity_steps": 1, "pairs_per_step": 2, "mode": "mixed"})
    method.frame = frame
    model = method.model
    before = {k: v.clone() for k, v in model.trainable_state_dict().items()}
    history = method.fit(items, [], TrainBudget(steps=2, seed=0), work_dir=tmp_path / "run")
    assert [row["phase"] for row in history] == ["similarity", "pairs", "pairs"]
    changed = [k for k, v in model.trainable_state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("adapters.") for k in changed) and any("mask_decoder" in k for k in changed)
    assert not any(k.startswith("vision_language.") for k in model.trainable_state_dict())  # CLIP stays frozen

    reloaded = load_checkpoint(tmp_path / "run" / "model")
    assert reloaded.model.vision_language.pretrained == str(clip_file)
    assert reloaded.frame == frame and reloaded.concepts == card.names()
    image = items[0]["image"][None]
    with torch.no_grad():
        ours, theirs = model.eval()(image, ["liver", "spleen"]), reloaded.model(image, ["liver", "spleen"])
    assert ours.similarity_logits.shape == (1, 2, 4, 4)  # the CLIP patch grid (64 px / 16)
    assert torch.allclose(ours.mask_logits, theirs.mask_logits, atol=1e-5)
    assert torch.allclose(ours.similarity_logits, theirs.similarity_logits, atol=1e-6)
