"""Labelled volumes -> training items in the model's frame: loading, item contents, sampling rules."""
import math

import nibabel as nib
import numpy as np
import pytest
import torch

from medclipsam.data.concepts import load_card
from medclipsam.data.frame import FrameSettings
from medclipsam.data.slices import frame_case, load_case, slice_items, unlabelled_items, view_plane
from medclipsam.errors import InputError

SHAPE = (40, 50, 12)
SPACING = (1.5, 1.2, 4.0)
ORGANS = {  # label id: (centre, radii) in voxels, HU
    1: ((14, 22, 6), (9, 12, 4.5), 60),
    2: ((30, 32, 5), (5, 7, 3), 50),
    3: ((27, 12, 7), (4, 5, 3), 150),
}
CARD_YAML = """\
name: toy
title: toy abdomen
source: made in the test
licence: CC0
modality: CT
labels:
  1: {name: liver, synonyms: [hepar]}
  2: {name: spleen}
  3: {name: right kidney, synonyms: [kidney_right]}
  4: {name: aorta}
  5: {name: stomach}
"""


def ellipsoid_phantom() -> tuple[np.ndarray, np.ndarray]:
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"), axis=-1)
    label = np.zeros(SHAPE, np.uint8)
    image = np.full(SHAPE, -100, np.int16)
    for label_id, (centre, radii, hu) in ORGANS.items():
        inside = (((grid - centre) / radii) ** 2).sum(-1) < 1
        label[inside], image[inside] = label_id, hu
    return image, label


def write_nifti(array: np.ndarray, path) -> str:
    affine = np.diag([-SPACING[0], -SPACING[1], SPACING[2], 1.0])  # LPS: the loader must reorient to RAS
    affine[:3, 3] = (30.0, 40.0, -20.0)
    nib.save(nib.Nifti1Image(array, affine), path)
    return str(path)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("slices")
    image, label = ellipsoid_phantom()
    item = {"image": write_nifti(image, root / "toy_001.nii.gz"), "label": write_nifti(label, root / "toy_001_seg.nii.gz")}
    (root / "toy.yaml").write_text(CARD_YAML)
    return {"root": root, "item": item, "label": label, "card": load_card(root / "toy.yaml")}


@pytest.fixture(scope="module")
def case(dataset):
    return load_case(dataset["item"])


SETTINGS = FrameSettings(size=64, field_of_view_mm=96.0)  # 1.5 mm pixels: the toy's 60 x 60 mm fits with air around


@pytest.fixture(scope="module")
def framed(case):
    return frame_case(case, SETTINGS)


def test_load_case_reorients_to_ras_and_keeps_raw_intensities(case, dataset):
    assert case["case_id"] == "toy_001"
    assert case["image"].shape == (1, *SHAPE) and case["label"].shape == (1, *SHAPE)
    assert np.allclose(np.diag(np.asarray(case["image"].affine))[:3], SPACING)  # positive diagonal: RAS
    np.testing.assert_array_equal(case["label"][0].numpy(), dataset["label"][::-1, ::-1, :])
    liver = case["label"][0] == 1
    assert torch.allclose(case["image"][0][liver], torch.tensor(60.0))  # HU: the frame windows, not the loader


def test_framed_case_is_windowed_and_labels_follow_the_image(framed, case):
    assert framed.images.shape == (SHAPE[2], 1, 64, 64) and framed.labels.shape == (SHAPE[2], 64, 64)
    assert float(framed.images.min()) >= 0.0 and float(framed.images.max()) <= 1.0
    liver = framed.labels == 1
    inside = torch.nn.functional.max_pool2d((~liver).float()[:, None], 3, 1, 1)[:, 0] == 0  # away from edges
    assert torch.allclose(framed.images[:, 0][inside], torch.tensor((60 + 160) / 400), atol=1e-4)  # W400/L40
    for label_id in ORGANS:  # organ areas in mm^2 are kept (1.5 mm frame pixels vs 1.5 x 1.2 mm voxels)
        frame_mm2 = float((framed.labels == label_id).sum()) * SETTINGS.pixel_mm ** 2
        voxel_mm2 = float((case["label"][0] == label_id).sum()) * SPACING[0] * SPACING[1]
        assert frame_mm2 == pytest.approx(voxel_mm2, rel=0.08), label_id


def test_slice_item_contents(framed, dataset):
    items = slice_items(framed, dataset["card"], absent_per_slice=2, empty_ratio=0.0)
    assert items and all(item["case_id"] == "toy_001" for item in items)
    for item in items:
        k = len(item["concepts"])
        assert item["image"].shape == (3, 64, 64) and item["image"].dtype == torch.float32
        assert torch.equal(item["image"][0], item["image"][2])
        assert item["masks"].shape == (k, 64, 64) and item["masks"].dtype == torch.float32
        assert len(item["label_ids"]) == len(item["present"]) == k
        assert set(item["masks"].unique().tolist()) <= {0.0, 1.0}
        present = [c for c, p in zip(item["concepts"], item["present"]) if p]
        absent = [c for c, p in zip(item["concepts"], item["present"]) if not p]
        assert present and len(absent) == 2 and not set(absent) & set(present)
        assert all(item["masks"][i].sum() > 0 for i, p in enumerate(item["present"]) if p)
        assert all(item["masks"][i].sum() == 0 for i, p in enumerate(item["present"]) if not p)
        assert set(item["concepts"]) <= set(dataset["card"].names())
        plane = framed.labels[item["slice_index"]]
        for label_id, mask, is_present in zip(item["label_ids"], item["masks"], item["present"]):
            assert not is_present or torch.equal(mask.bool(), plane == label_id)


def test_empty_slice_ratio_and_step(framed, dataset):
    foreground = [i for i in range(SHAPE[2]) if framed.labels[i].any()]
    n_empty = SHAPE[2] - len(foreground)
    assert n_empty >= 1

    def counts(**options):
        kept = [item["slice_index"] for item in slice_items(framed, dataset["card"], **options)]
        return sorted(set(kept) & set(foreground)), sorted(set(kept) - set(foreground))

    fg, empty = counts(empty_ratio=0.25)
    assert fg == foreground and len(empty) == min(n_empty, math.floor(0.25 * len(foreground) + 0.5))
    assert counts(empty_ratio=0.0) == (foreground, [])
    assert counts(empty_ratio=math.inf)[1] == sorted(set(range(SHAPE[2])) - set(foreground))
    assert counts(empty_ratio=0.0, slice_step=2)[0] == foreground[::2]
    assert [u["slice_index"] for u in unlabelled_items(framed, slice_step=3)] == list(range(0, SHAPE[2], 3))


def test_sampling_is_deterministic_per_seed(framed, dataset):
    def summary(seed):
        items = slice_items(framed, dataset["card"], empty_ratio=0.3, seed=seed)
        return [(item["slice_index"], tuple(item["concepts"])) for item in items]

    first = slice_items(framed, dataset["card"], empty_ratio=0.3, seed=4)
    again = slice_items(framed, dataset["card"], empty_ratio=0.3, seed=4)
    assert all(torch.equal(a["masks"], b["masks"]) and torch.equal(a["image"], b["image"]) for a, b in zip(first, again))
    assert summary(4) == summary(4)
    assert len({tuple(summary(seed)) for seed in range(4)}) > 1


def test_label_values_missing_from_the_card_are_named(case, dataset):
    bad = dict(case, label=case["label"].clone())
    bad["label"][0, 20, 25, 6] = 9
    with pytest.raises(InputError) as err:
        slice_items(frame_case(bad, SETTINGS), dataset["card"])
    assert "[9]" in err.value.problem and "'toy'" in err.value.problem
    assert err.value.path == dataset["item"]["label"]


def test_an_unlabelled_entry_names_itself(dataset):
    case = load_case({"image": dataset["item"]["image"]})
    with pytest.raises(InputError, match="has no label") as err:
        slice_items(frame_case(case, SETTINGS), dataset["card"])
    assert err.value.path == "toy_001" and "datalist" in err.value.fix


def test_empty_label_is_refused(dataset, tmp_path):
    empty = write_nifti(np.zeros(SHAPE, np.uint8), tmp_path / "empty_seg.nii.gz")
    with pytest.raises(InputError, match="empty label") as err:
        load_case({"image": dataset["item"]["image"], "label": empty})
    assert err.value.path == empty and "remove this case from the datalist" in err.value.fix


def test_view_plane_shows_the_patients_right_on_the_left_and_anterior_at_the_top():
    volume = torch.zeros(1, 4, 5, 3)
    volume[0, 3, 4, 1] = 1.0  # most right, most anterior voxel of an axial slice (RAS voxel order)
    plane = view_plane(volume, 1)
    assert plane.shape == (5, 4) and plane[0, 0] == 1.0 and plane.sum() == 1.0
