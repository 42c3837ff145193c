"""The trainer learns on phantom slices from cached trunk features, logs every step, and resumes exactly."""
import csv

import pytest
import torch

from medclipsam.data.concepts import load_card
from medclipsam.data.frame import FrameSettings
from medclipsam.data.phantom import make_phantom
from medclipsam.data.slices import frame_case, load_case, slice_items
from medclipsam.models.clip_guided_sam import CLIPGuidedSAM, CLIPGuidedSAMConfig
from medclipsam.models.factory import build_method, create_model
from medclipsam.training.loop import TrainBudget
from medclipsam.training.trainer import TrainConfig, Trainer, parameter_groups, similarity_parameters

TINY = dict(sam="tiny_vit", vision_language_kwargs={"sam_channels": 32, "hidden": 32}, adapter_blocks="last1")


def _items(tmp_path, size=256, step=6):
    make_phantom(1).to_nifti(tmp_path / "ct.nii.gz", tmp_path / "label.nii.gz")
    case = load_case({"image": str(tmp_path / "ct.nii.gz"), "label": str(tmp_path / "label.nii.gz")})
    framed = frame_case(case, FrameSettings(size=size))
    return slice_items(framed, load_card("phantom"), empty_ratio=0, absent_per_slice=9, slice_step=step)


def test_text_only_training_reduces_loss_on_phantom_slices(tmp_path):
    items = _items(tmp_path)[:2]
    torch.manual_seed(0)
    model = CLIPGuidedSAM(CLIPGuidedSAMConfig(adapter_blocks="last1"))
    config = TrainConfig(similarity_steps=20, steps=3, pairs_per_step=4, seed=0)
    assert len(parameter_groups(model, config)) == 4
    trainer = Trainer(model, items, config)
    history = [trainer.step() for _ in range(20)]
    warmed = [p.detach().clone() for p in similarity_parameters(model)]
    decoder = [p.detach().clone() for p in model.mask_decoder.parameters()]
    trainer.fit()
    history += trainer.history
    assert [row["phase"] for row in history] == ["similarity"] * 20 + ["pairs"] * 3
    warmup = [row["similarity"] for row in history[:20]]
    assert sum(warmup[-3:]) / 3 < 0.75 * sum(warmup[:3]) / 3
    assert all(0 < row["mask"] < 5 for row in history[20:])
    # pair steps train the decoder and adapters on top of the warmed-up map, which stays fixed (lr_similarity_pairs 0)
    assert all(torch.equal(a, b) for a, b in zip(warmed, similarity_parameters(model)))
    assert not all(torch.equal(a, b) for a, b in zip(decoder, model.mask_decoder.parameters()))
    assert all(not p.requires_grad for p in model.sam.mask_decoder.parameters())  # the backbone's stays pristine


def test_resume_continues_exactly_and_logs_every_step(tmp_path):
    items = _items(tmp_path, size=128, step=8)
    budget = TrainBudget(steps=4, slices_per_step=2, seed=3)
    options = {"similarity_steps": 2, "pairs_per_step": 3, "checkpoint_every": 3}

    def fresh_method():
        torch.manual_seed(0)
        return build_method("clip_guided_sam", load_card("phantom").names(), model_options=TINY,
                            train_options=options)

    straight = fresh_method()
    straight.fit(items, [], budget, work_dir=tmp_path / "straight")

    interrupted = tmp_path / "interrupted"
    first = fresh_method().trainer(items, budget, work_dir=interrupted)
    while first.step_done < 3:  # the run is "killed" right after its checkpoint at step 3
        first.history.append(first.step())
        if first.step_done == 3:
            first.save()
    resumed_method = fresh_method()
    resumed = resumed_method.trainer(items, budget, work_dir=interrupted)
    resumed.fit()
    assert resumed.history[0]["step"] == 4 and resumed.step_done == 6
    for name, value in straight.model.trainable_state_dict().items():
        assert torch.allclose(value, resumed_method.model.trainable_state_dict()[name], atol=1e-6), name
    with open(interrupted / "log.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in rows] == [4, 5, 6]  # the killed run wrote no log, the resumed one its steps
    reloaded = create_model(interrupted / "model")  # the method's checkpoint, in the common format
    assert reloaded.checkpoint_extra["step"] == 6
    for name, value in resumed_method.model.trainable_state_dict().items():
        assert torch.equal(value, reloaded.model.trainable_state_dict()[name])


def test_a_finished_run_is_extended_by_more_steps_and_other_changes_are_refused(tmp_path):
    """Re-running with a larger --steps continues a finished run where it stopped (the default model's recipe may
    train on); any other setting changed, or fewer steps than done, is refused with the reason."""
    items = _items(tmp_path, size=128, step=8)
    options = {"similarity_steps": 2, "pairs_per_step": 3}

    def trainer(steps: int, **changed):
        torch.manual_seed(0)
        method = build_method("clip_guided_sam", load_card("phantom").names(), model_options=TINY,
                              train_options={**options, **changed})
        return method.trainer(items, TrainBudget(steps=steps, slices_per_step=2, seed=3), work_dir=tmp_path / "run")

    trainer(3).fit()
    extended = trainer(5)
    extended.fit()
    assert [row["step"] for row in extended.history] == [6, 7] and extended.step_done == 7
    with open(tmp_path / "run" / "log.csv", newline="") as handle:
        assert [int(r["step"]) for r in csv.DictReader(handle)] == list(range(1, 8))
    with pytest.raises(ValueError, match="another training config"):
        trainer(9, pairs_per_step=4).fit()
    with pytest.raises(ValueError, match="past this run's 4"):
        trainer(2).fit()


def test_clip_guided_sam_method_reports_training_progress(tmp_path):
    items = _items(tmp_path, size=128, step=8)
    method = build_method("clip_guided_sam", load_card("phantom").names(), model_options=TINY,
                          train_options={"similarity_steps": 12, "pairs_per_step": 2})
    lines: list[str] = []
    history = method.fit(items, [], TrainBudget(steps=8, slices_per_step=2, seed=0), progress=lines.append)
    assert len(history) == 20  # 12 warm-up + 8 pair steps
    assert [line.split(" total ")[0] for line in lines] == ["clip_guided_sam: step 10/20", "clip_guided_sam: step 20/20"]
    assert f"mask {history[-1]['mask']:.4f}" in lines[-1]  # the last step's loss terms
