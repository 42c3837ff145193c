"""`model.segment(...)`: slices and volumes, manual and text-only, prompts in the input's own coordinates and
results on the input's own grid."""
import nibabel as nib
import numpy as np
import pytest
import torch

from medclipsam.data.concepts import load_card
from medclipsam.data.io import save_mask
from medclipsam.data.phantom import make_phantom
from medclipsam.data.slices import label_plane, load_case
from medclipsam.errors import InputError
from medclipsam.models.clip_guided_sam import CLIPGuidedSAM, CLIPGuidedSAMConfig


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return CLIPGuidedSAM(CLIPGuidedSAMConfig(adapter_blocks="last1")).eval()


@pytest.fixture(scope="module")
def phantom_case(tmp_path_factory):
    folder = tmp_path_factory.mktemp("phantom")
    make_phantom(5, shape=(96, 80, 16), spacing=(4.0, 4.5, 10.0)).to_nifti(folder / "ct.nii.gz", folder / "lab.nii.gz")
    case = load_case({"image": str(folder / "ct.nii.gz"), "label": str(folder / "lab.nii.gz")})
    return folder, case


def _dice(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def test_slice_with_boxes_in_its_own_pixels(model, phantom_case):
    _, case = phantom_case
    label = case["label"]
    index = int(torch.argmax((label[0] == 1).sum((0, 1))))  # the slice with the most liver
    image = label_plane(case["image"], 2, index)  # (H, W) non-square slice, viewing orientation
    plane = label_plane(label, 2, index)
    values, counts = torch.unique(plane[plane > 0], return_counts=True)
    largest = values[torch.argsort(counts, descending=True)[:2]].tolist()  # the liver and the next largest organ
    names = [load_card("phantom").concepts[int(v)].name for v in largest]
    truth = torch.stack([plane == v for v in largest])
    boxes = []
    for mask in truth:
        ys, xs = torch.nonzero(mask, as_tuple=True)
        boxes.append([xs.min(), ys.min(), xs.max(), ys.max()])
    result = model.segment(image, names, boxes=torch.tensor(boxes, dtype=torch.float32))
    assert names[0] == "liver"
    assert result.masks.shape == truth.shape and result.probabilities.shape == truth.shape
    assert _dice(result.masks[0], truth[0]) > 0.85 and _dice(result.masks[1], truth[1]) > 0.8
    assert result.confidence.shape == (2,)


def test_volume_with_3d_box_lands_on_the_input_grid(model, phantom_case, tmp_path):
    folder, case = phantom_case
    truth = case["label"][0] == 1
    xs, ys, zs = torch.nonzero(truth, as_tuple=True)
    z_mid = int(zs.float().median())
    box = [int(xs.min()), int(ys.min()), z_mid - 1, int(xs.max()), int(ys.max()), z_mid + 1]
    result = model.segment(case["image"], ["liver"], boxes={"liver": box})
    assert tuple(result.labels.shape) == tuple(case["image"].shape[1:])
    assert result.slice_range["liver"] == (z_mid - 1, z_mid + 1)
    predicted = result.labels == result.label_values["liver"]
    assert not predicted[..., : z_mid - 1].any() and not predicted[..., z_mid + 2:].any()
    inside = slice(z_mid - 1, z_mid + 2)
    assert _dice(predicted[..., inside], truth[..., inside]) > 0.8
    written = save_mask(result.as_metatensor(), like=str(folder / "ct.nii.gz"), path=tmp_path / "liver.nii.gz")
    scan, mask = nib.load(folder / "ct.nii.gz"), nib.load(written)
    assert mask.shape == scan.shape and np.allclose(mask.affine, scan.affine)
    assert int((np.asarray(mask.dataobj) == 1).sum()) == int(predicted.sum())


def test_bad_inputs_say_what_is_wrong(model):
    with pytest.raises(InputError, match=r"expected \[0, 1\]"):
        model.segment(torch.full((32, 32), 400.0), ["liver"])
    with pytest.raises(InputError, match="needs a box for every concept"):
        model.segment(torch.zeros(1, 8, 8, 4), ["liver", "spleen"], boxes={"liver": [0, 0, 0, 7, 7, 3]})
