"""The MONAI bundle in configs/: training (one process and torchrun DDP), inference, evaluation, method override and
metadata, run through `monai.bundle` on tiny phantoms with a tiny random SAM ViT."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.bundle import run, verify_metadata
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from medclipsam.bundle.engines import StepTrainer
from medclipsam.bundle.handlers import StepCsvLog, TrainingCheckpoint
from medclipsam.bundle.inference import mask_name
from medclipsam.data.concepts import load_card
from medclipsam.data.datalists import load_datalist
from medclipsam.data.frame import FrameSettings
from medclipsam.data.phantom import make_phantom, write_phantom_dataset
from medclipsam.data.slices import frame_case, load_case, slice_items
from medclipsam.errors import OutputExistsError, WeightsError
from medclipsam.eval.evaluate import evaluate_method, segment_case
from medclipsam.eval.metrics import summarize
from medclipsam.inference.predictor import Predictor
from medclipsam.models.checkpoints import WEIGHTS_FILE, read_checkpoint
from medclipsam.models.factory import build_method, create_model
from medclipsam.training.loop import TrainBudget

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
SCHEMA = CONFIGS / "schema" / "meta_schema_20240725.json"
SCHEMA_MD5 = "76e1add273836515d0bbb3bc71962474"
WARMUP, PAIR_STEPS = 30, 2
TRAIN_OPTIONS = "method_options#clip_guided_sam#train_options"
TINY = {  # bundle overrides: tiny random backbone, every 4th slice, a short schedule (the defaults stay LiteMedSAM)
    "model#sam": "tiny_vit",
    "model#vision_language_kwargs": {"sam_channels": 32, "hidden": 32},
    "slice_step": 4,
    "augment_views": 2,
    "train#budget#steps": PAIR_STEPS,
    f"{TRAIN_OPTIONS}#similarity_steps": WARMUP,
    f"{TRAIN_OPTIONS}#pairs_per_step": 2,
    f"{TRAIN_OPTIONS}#lr_adapters": 0.003,
    f"{TRAIN_OPTIONS}#similarity_pixels_per_step": 1024,
    f"{TRAIN_OPTIONS}#checkpoint_every": 0,
}
UNET = {  # the method override: a small supervised UNet baseline
    "method": "supervised_unet",
    "method_options#supervised_unet": {"channels": [8, 16, 32], "internal_size": 64, "image_size": 128},
    "slice_step": 2,
    "augment_views": 1,
    "train#budget#steps": 80,
    "train#budget#slices_per_step": 4,
}

DUMP_RANKS = """\
finalize:
  - "$torch.save(@network.model.trainable_state_dict(), @output_dir + '/rank%d.pt' % torch.distributed.get_rank())"
  - $torch.distributed.destroy_process_group()
"""


def bundle(run_id: str, *configs: str, **overrides) -> None:
    """`python -m monai.bundle run RUN_ID --config_file [...] --key value ...`, in this process."""
    run(run_id, config_file=[str(CONFIGS / name) for name in configs], **overrides)


def read_log(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("phantoms")
    return write_phantom_dataset(root, 2, seed=0, shape=(64, 64, 16), n_validation=1).parent


@pytest.fixture(scope="module")
def trained(phantoms, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train")
    bundle("training", "train.yaml", dataset_dir=str(phantoms), output_dir=str(out), **TINY)
    return out


@pytest.fixture(scope="module")
def unet_run(phantoms, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("unet")
    bundle("training", "train.yaml", dataset_dir=str(phantoms), output_dir=str(out), **UNET)
    return out


def test_bundle_configs_are_ascii():
    """monai.bundle opens configs in the platform's default encoding: anything beyond ASCII breaks on some locales
    (seen here: a "±" in a comment failed to decode once matplotlib had reset the locale in the same process)."""
    for config in sorted(CONFIGS.glob("*.yaml")) + sorted(CONFIGS.glob("*.json")):
        text = config.read_bytes()
        assert text.isascii(), (config.name, [line for line in text.splitlines() if not line.isascii()])


def test_training_writes_checkpoint_log_and_tensorboard_and_learns_the_similarity_map(trained):
    method = create_model(trained / "model")
    assert method.model.config.sam == "tiny_vit" and method.model.config.vision_language == "minilm"
    assert method.frame == FrameSettings(size=128)  # the bundle's frame, saved with the model
    assert read_checkpoint(trained / "model").extra["step"] == WARMUP + PAIR_STEPS
    rows = read_log(trained / "log.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, WARMUP + PAIR_STEPS + 1))
    assert [r["phase"] for r in rows] == ["similarity"] * WARMUP + ["pairs"] * PAIR_STEPS
    warmup = [float(r["similarity"]) for r in rows[:WARMUP]]
    assert np.mean(warmup[-5:]) < 0.6 * np.mean(warmup[:5])  # the similarity map learns
    events = EventAccumulator(str(trained / "tensorboard"))
    events.Reload()
    totals = events.Scalars("total")
    assert [e.step for e in totals] == list(range(1, WARMUP + PAIR_STEPS + 1))
    assert np.allclose([e.value for e in totals], [float(r["total"]) for r in rows], rtol=1e-4)


def test_training_a_finished_run_again_changes_nothing(trained, phantoms):
    before = {p.name: p.read_bytes() for p in (trained / "model").iterdir()}
    log_before = (trained / "log.csv").read_text()
    bundle("training", "train.yaml", dataset_dir=str(phantoms), output_dir=str(trained), **TINY)
    assert {p.name: p.read_bytes() for p in (trained / "model").iterdir()} == before
    assert (trained / "log.csv").read_text() == log_before


class Crash(Exception):
    pass


class CrashAt:
    """A handler that kills the run right after a given step, as a crash would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED(once=self.step), self.crash)

    @staticmethod
    def crash(engine) -> None:
        raise Crash()


def test_step_trainer_resumes_exactly_after_a_crash(tmp_path):
    make_phantom(1, shape=(64, 64, 16)).to_nifti(tmp_path / "ct.nii.gz", tmp_path / "label.nii.gz")
    case = load_case({"image": str(tmp_path / "ct.nii.gz"), "label": str(tmp_path / "label.nii.gz")})
    items = slice_items(frame_case(case, FrameSettings(size=128)), load_card("phantom"), empty_ratio=0,
                        absent_per_slice=9, slice_step=4)
    budget = TrainBudget(steps=4, slices_per_step=2, seed=3)

    def engine(folder: Path, *extra) -> StepTrainer:
        torch.manual_seed(0)
        method = build_method("clip_guided_sam", load_card("phantom").names(),
                              model_options={"sam": "tiny_vit", "vision_language_kwargs": {"sam_channels": 32,
                                                                                           "hidden": 32}},
                              train_options={"similarity_steps": 2, "pairs_per_step": 3, "checkpoint_every": 3})
        handlers = [TrainingCheckpoint(3), StepCsvLog(folder / "log.csv"), *extra]
        return StepTrainer(method.trainer(items, budget, work_dir=folder), handlers)

    straight = engine(tmp_path / "straight")
    straight.run()

    with pytest.raises(Crash):
        engine(tmp_path / "crashed", CrashAt(4)).run()  # killed at step 4, one step after its checkpoint
    assert [int(r["step"]) for r in read_log(tmp_path / "crashed" / "log.csv")] == [1, 2, 3, 4]
    resumed = engine(tmp_path / "crashed")
    assert resumed.state.iteration == 3
    resumed.run()
    assert [int(r["step"]) for r in read_log(tmp_path / "crashed" / "log.csv")] == [1, 2, 3, 4, 5, 6]
    expected = straight.steps.model.trainable_state_dict()
    for name, value in resumed.steps.model.trainable_state_dict().items():
        assert torch.allclose(value, expected[name], atol=1e-6), name


def _mask(path: Path) -> tuple[np.ndarray, np.ndarray]:
    image = nib.load(str(path))
    return np.asarray(image.dataobj), image.affine


def test_inference_writes_each_mask_in_its_scan_geometry(trained, phantoms, tmp_path):
    out = tmp_path / "inference"
    bundle("inference", "inference.yaml", dataset_dir=str(phantoms), data_key="validation",
           checkpoint=str(trained / "model"), output_dir=str(out))
    card = load_card("phantom")
    assert json.loads((out / "labels.json").read_text()) == {"0": "background", **{
        str(i): name for i, name in card.label_map().items()}}
    predictor = Predictor(create_model(trained / "model"), device="cpu")
    for item in load_datalist(phantoms / "dataset.json", key="validation"):
        labels, affine = _mask(out / mask_name(item["case_id"]))
        scan = nib.load(item["image"])
        assert labels.shape == scan.shape and np.allclose(affine, scan.affine)
        expected = segment_case(predictor, load_case({"image": item["image"]}), card)  # the same predictor's road
        assert np.array_equal(labels, expected)  # the phantom is stored in RAS: RAS labels are its own
    with pytest.raises(RuntimeError) as error:  # never overwrites without being asked
        bundle("inference", "inference.yaml", dataset_dir=str(phantoms), data_key="validation",
               checkpoint=str(trained / "model"), output_dir=str(out))
    assert isinstance(error.value.__cause__, OutputExistsError) and "_mask.nii.gz" in str(error.value.__cause__)


def test_method_override_trains_a_baseline_that_evaluation_and_inference_load(unet_run, phantoms, tmp_path):
    meta = json.loads((unet_run / "model" / "method.json").read_text())
    assert meta["method"] == "supervised_unet" and meta["options"]["channels"] == [8, 16, 32]
    assert [r["step"] for r in read_log(unet_run / "log.csv")] == ["80"]
    bundle("evaluation", "evaluate.yaml", dataset_dir=str(phantoms), checkpoint=str(unet_run / "model"),
           output_dir=str(tmp_path / "eval"))
    bundle("inference", "inference.yaml", dataset_dir=str(phantoms), data_key="validation",
           checkpoint=str(unet_run / "model"), output_dir=str(tmp_path / "masks"))
    card = load_card("phantom")
    method = create_model(unet_run / "model")
    cases = load_datalist(phantoms / "dataset.json", key="validation")
    expected = evaluate_method(method, cases, card)
    written = read_log(tmp_path / "eval" / "metrics.csv")
    assert [(r["case_id"], r["concept"]) for r in written] == [(r["case_id"], r["concept"]) for r in expected]
    assert np.allclose([float(r["dice"]) for r in written], [r["dice"] for r in expected], atol=1e-6)
    summary = {r["concept"]: float(r["dice_mean"]) for r in read_log(tmp_path / "eval" / "summary.csv")}
    assert summary == pytest.approx({r["concept"]: r["dice_mean"] for r in summarize(expected)}, abs=1e-6)
    assert summary["liver"] > 0.6  # the baseline really trained (an untrained one scores 0)
    labels, _ = _mask(tmp_path / "masks" / mask_name(cases[0]["case_id"]))
    predictor = Predictor(method, device="cpu")
    assert np.array_equal(labels, segment_case(predictor, load_case({"image": cases[0]["image"]}), card))
    assert (labels == 1).sum() > 0


def test_a_folder_without_a_checkpoint_is_explained(tmp_path):
    with pytest.raises(WeightsError) as error:
        create_model(tmp_path)
    assert str(tmp_path) in str(error.value) and "method.json" in str(error.value)


def test_multi_gpu_training_on_two_gloo_processes(trained, phantoms, tmp_path):
    out = tmp_path / "ddp"
    dump = tmp_path / "dump_ranks.yaml"  # a test-only layer: each rank saves its trained weights at the end
    dump.write_text(DUMP_RANKS)
    configs = [str(CONFIGS / "train.yaml"), str(CONFIGS / "multi_gpu_train.yaml"), str(dump)]
    overrides = [f"--{key}={value}" for key, value in TINY.items()]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "monai.bundle", "run", "training", "--config_file", repr(configs),
               "--dataset_dir", str(phantoms), "--output_dir", str(out), *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rank0, rank1 = (torch.load(out / f"rank{r}.pt") for r in (0, 1))
    assert rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)  # gradients were averaged: replicas stayed equal
    saved, single = (load_file(run / "model" / WEIGHTS_FILE) for run in (out, trained))
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in single.items()}
    assert all(torch.equal(saved[f"model.{k}"], rank0[k].cpu()) for k in rank0)
    assert any(not torch.equal(saved[k], single[k]) for k in saved)  # each rank trained on its own half of the slices
    assert create_model(out / "model").model.config == create_model(trained / "model").model.config
    assert [int(r["step"]) for r in read_log(out / "log.csv")] == list(range(1, WARMUP + PAIR_STEPS + 1))
    assert len(list((out / "tensorboard").iterdir())) == 1  # rank 0 alone writes
    assert len(torch.load(out / "trainer_state.pt", weights_only=False)["generator"]) == 2


def test_metadata_verifies_offline_against_the_vendored_schema(tmp_path):
    verify_metadata(meta_file=str(CONFIGS / "metadata.json"), filepath=str(SCHEMA), hash_val=SCHEMA_MD5)
    broken = json.loads((CONFIGS / "metadata.json").read_text())
    del broken["network_data_format"]
    (tmp_path / "metadata.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="network_data_format"):
        verify_metadata(meta_file=str(tmp_path / "metadata.json"), filepath=str(SCHEMA), hash_val=SCHEMA_MD5)
