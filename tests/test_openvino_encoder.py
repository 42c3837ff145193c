"""The slice encoder on OpenVINO: the same features as PyTorch (the reference path) within a tolerance, the same
masks with the shipped model, converted once per weights and cached, and chosen by "auto" only when it pays."""
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from medclipsam.data.phantom import make_phantom
from medclipsam.data.phantom.classic import organ_ids
from medclipsam.errors import InputError
from medclipsam.inference import openvino_encoder
from medclipsam.inference.openvino_encoder import OpenVINOImagePath, image_path_runtime, ir_path
from medclipsam.inference.predictor import Predictor
from medclipsam.methods.trivial import EmptyPredictor
from medclipsam.models.factory import build_method, create_model

CPU = torch.device("cpu")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(openvino_encoder.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache" / "openvino"


def tiny_method(seed: int = 0):
    torch.manual_seed(seed)
    return build_method("clip_guided_sam", ["liver", "spleen"], model_options={"sam": "tiny_tinyvit"})


def test_openvino_features_match_pytorch_and_the_conversion_is_cached(cache):
    method = tiny_method()
    images = torch.rand(3, 3, method.image_size, method.image_size)
    with torch.no_grad():
        reference = method.frozen_image_path()(images)
    path = OpenVINOImagePath(method)
    assert path.xml.is_file() and path.xml.is_relative_to(cache)
    for found, expected in zip(path(images, None), reference):
        assert found.shape == expected.shape
        assert float((found - expected).abs().max()) <= 1e-4 * float(expected.abs().max())
    for found, expected in zip(path(images, torch.bfloat16), reference):  # bfloat16 where the CPU has it
        assert float((found - expected).abs().max()) <= 0.1 * float(expected.abs().max())
    written = path.xml.stat().st_mtime_ns
    assert OpenVINOImagePath(method).xml == path.xml and path.xml.stat().st_mtime_ns == written  # not converted again
    assert ir_path(tiny_method(seed=1).frozen_image_path(), method.image_size) != path.xml  # other weights, other IR


def test_auto_takes_openvino_only_where_the_conversion_pays(cache):
    method = tiny_method()
    assert image_path_runtime(method, CPU, "auto", slices=8) is None
    assert image_path_runtime(method, CPU, "torch", slices=1000) is None
    assert isinstance(image_path_runtime(method, CPU, "auto", slices=64), OpenVINOImagePath)
    assert image_path_runtime(method, CPU, "auto", slices=8) is None  # the same choice with a cached conversion
    assert isinstance(image_path_runtime(method, CPU, "openvino", slices=1), OpenVINOImagePath)
    assert image_path_runtime(method, torch.device("meta"), "auto", slices=1000) is None  # not a CPU


def test_bad_runtime_requests_fail_clearly(cache):
    with pytest.raises(InputError, match="not one of auto, torch, openvino"):
        Predictor(tiny_method(), device="cpu", runtime="onnx")
    with pytest.raises(InputError, match="frozen image path"):
        image_path_runtime(EmptyPredictor(["liver"], image_size=32), CPU, "openvino")


def test_shipped_model_gives_the_same_masks_on_openvino(cache):
    """Full precision against full precision: the runtimes agree voxel for voxel but for a few boundary voxels.
    (Under AMP each path rounds its own way to bfloat16: measured on this phantom, PyTorch's own AMP moves the
    spleen's Dice by 0.15 against full precision, so runtimes under AMP are compared on features above.)"""
    organs = ["liver", "spleen", "right kidney", "aorta"]
    phantom = make_phantom(501, shape=(96, 96, 8), spacing=(4.0, 4.0, 12.0))
    scan = MetaTensor(torch.from_numpy(phantom.image)[None].float(), affine=torch.from_numpy(phantom.affine))
    labels = {}
    for runtime in ("torch", "openvino"):
        predictor = Predictor(create_model("default", concepts=organs), device="cpu", runtime=runtime, amp=False)
        predictor.set_volume(scan)
        labels[runtime] = predictor.predict(organs).labels
        assert (predictor.image_path is not None) == (runtime == "openvino")
    for value, organ in enumerate(organs, start=1):
        truth = phantom.label == organ_ids()[organ]
        dice = {r: 2 * ((m == value) & truth).sum() / ((m == value).sum() + truth.sum()) for r, m in labels.items()}
        assert dice["torch"] > 0.35, (organ, dice)  # the comparison means something
        assert abs(dice["openvino"] - dice["torch"]) <= 0.002, (organ, dice)
    assert np.mean(labels["torch"] != labels["openvino"]) < 0.001
