"""Volume → slice items → predictions → volume: geometry round trips, sampling rules, batching."""
import math

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import CacheDataset, DataLoader, MetaTensor

from medclipsam.data.concepts import load_card
from medclipsam.data.io import load_scan, save_mask
from medclipsam.data.slices import (
    LoadCase,
    SliceDataset,
    SliceGeometry,
    collate_slices,
    from_model_size,
    load_case,
    plane_shape,
    reassemble,
    slice_items,
    to_model_size,
    volume_slices,
)
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


def predicted_planes(items) -> dict[int, torch.Tensor]:
    """Use each item's masks as the model's output, undo the model size and turn them into a label plane."""
    planes = {}
    for item in items:
        probs = from_model_size(item["masks"], SliceGeometry.from_dict(item["geometry"]))
        plane = torch.zeros(probs.shape[-2:], dtype=torch.uint8)
        for k, label_id in enumerate(item["label_ids"]):
            plane[probs[k] > 0.5] = label_id
        planes[item["slice_index"]] = plane
    return planes


def round_trip(case, dataset, axis, size, out_path) -> np.ndarray:
    items = slice_items(case, dataset["card"], axis=axis, size=size, empty_ratio=math.inf)
    assert [item["slice_index"] for item in items] == list(range(SHAPE[axis]))
    volume = reassemble(predicted_planes(items), tuple(case["label"].shape[1:]), axis=axis)
    ras = MetaTensor(volume[None], affine=case["label"].affine)
    save_mask(ras, like=load_scan(dataset["item"]["image"]), path=out_path)
    return np.asarray(nib.load(out_path).dataobj)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_round_trip_is_exact_at_slice_size(case, dataset, axis, tmp_path):
    size = max(plane_shape(SHAPE, axis))  # no resize, only the bottom/right pad of non-square slices
    native = round_trip(case, dataset, axis, size, tmp_path / "pred.nii.gz")
    np.testing.assert_array_equal(native, dataset["label"])


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_round_trip_at_256_keeps_each_organ(case, dataset, axis, tmp_path):
    native = round_trip(case, dataset, axis, 256, tmp_path / "pred.nii.gz")
    truth = dataset["label"]
    assert native.shape == truth.shape
    for label_id in ORGANS:
        pred, true = native == label_id, truth == label_id
        dice = 2 * (pred & true).sum() / (pred.sum() + true.sum())
        assert dice >= 0.97, (axis, label_id, dice)


def test_load_case_reorients_to_ras_and_windows(case, dataset):
    assert case["case_id"] == "toy_001"
    assert case["image"].shape == (1, *SHAPE) and case["label"].shape == (1, *SHAPE)
    assert np.allclose(np.diag(np.asarray(case["image"].affine))[:3], SPACING)  # positive diagonal: RAS
    np.testing.assert_array_equal(case["label"][0].numpy(), dataset["label"][::-1, ::-1, :])
    assert float(case["image"].min()) >= 0.0 and float(case["image"].max()) <= 1.0
    liver = case["label"][0] == 1
    assert torch.allclose(case["image"][0][liver], torch.tensor((60 + 160) / 400))  # abdomen W400/L40


def test_slice_item_contents(case, dataset):
    items = slice_items(case, dataset["card"], axis=2, size=64, absent_per_slice=2, empty_ratio=0.0)
    assert items and all(item["case_id"] == "toy_001" and item["axis"] == 2 for item in items)
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
        # plane (50, 40) → resized (64, 51): the right-hand pad is zero in image and masks
        assert item["geometry"] == {"height": 50, "width": 40, "size": 64, "resized_height": 64, "resized_width": 51}
        assert item["image"][:, :, 51:].abs().sum() == 0 and item["masks"][:, :, 51:].sum() == 0


def test_slices_are_in_viewing_orientation():
    volume = torch.zeros(1, 4, 5, 3)
    volume[0, 3, 4, 1] = 1.0  # most right, most anterior voxel of an axial slice (RAS voxel order)
    slices = {index: image for index, image, _ in volume_slices(volume, axis=2, size=5)}
    assert slices[1][0, 0, 0] == 1.0 and slices[1].sum() == 3.0  # top-left, in all 3 channels


def test_empty_slice_ratio_and_step(case, dataset):
    label = case["label"][0]
    foreground = [i for i in range(SHAPE[0]) if label[i].any()]
    n_empty = SHAPE[0] - len(foreground)
    assert n_empty >= 8

    def counts(**options):
        items = slice_items(case, dataset["card"], axis=0, size=32, **options)
        kept = [item["slice_index"] for item in items]
        return sorted(set(kept) & set(foreground)), sorted(set(kept) - set(foreground))

    fg, empty = counts(empty_ratio=0.25)
    assert fg == foreground and len(empty) == math.floor(0.25 * len(foreground) + 0.5)
    assert counts(empty_ratio=0.0) == (foreground, [])
    assert counts(empty_ratio=math.inf)[1] == sorted(set(range(SHAPE[0])) - set(foreground))
    fg_step, empty_step = counts(empty_ratio=0.25, slice_step=2)
    assert fg_step == foreground[::2] and len(empty_step) == math.floor(0.25 * len(foreground[::2]) + 0.5)


def test_sampling_is_deterministic_per_seed(case, dataset):
    def summary(seed):
        items = slice_items(case, dataset["card"], axis=0, size=32, empty_ratio=0.3, seed=seed)
        return [(item["slice_index"], tuple(item["concepts"])) for item in items]

    first = slice_items(case, dataset["card"], axis=0, size=32, empty_ratio=0.3, seed=4)
    again = slice_items(case, dataset["card"], axis=0, size=32, empty_ratio=0.3, seed=4)
    assert all(torch.equal(a["masks"], b["masks"]) and torch.equal(a["image"], b["image"]) for a, b in zip(first, again))
    assert summary(4) == summary(4)
    assert len({tuple(summary(seed)) for seed in range(4)}) > 1


def test_label_values_missing_from_the_card_are_named(case, dataset):
    bad = dict(case, label=case["label"].clone())
    bad["label"][0, 0, 0, 0] = 9
    with pytest.raises(InputError) as err:
        slice_items(bad, dataset["card"])
    assert "[9]" in err.value.problem and "'toy'" in err.value.problem
    assert err.value.path == dataset["item"]["label"]


def test_empty_label_is_refused(dataset, tmp_path):
    empty = write_nifti(np.zeros(SHAPE, np.uint8), tmp_path / "empty_seg.nii.gz")
    with pytest.raises(InputError, match="empty label") as err:
        load_case({"image": dataset["item"]["image"], "label": empty})
    assert err.value.path == empty and "remove this case from the datalist" in err.value.fix


def test_model_size_round_trip():
    square = torch.rand(2, 32, 32)
    resized, geometry = to_model_size(square, 32)
    assert torch.equal(resized, square) and torch.equal(from_model_size(resized, geometry), square)

    yy, xx = torch.meshgrid(torch.arange(37), torch.arange(53), indexing="ij")
    mask = (((yy - 17) / 11.0) ** 2 + ((xx - 30) / 15.0) ** 2 < 1).float()[None]
    for size in (16, 256):
        model_mask, geometry = to_model_size(mask, size, mode="nearest-exact")
        assert model_mask.shape == (1, size, size)
        back = from_model_size(model_mask, geometry) > 0.5
        dice = 2 * (back & mask.bool()).sum() / (back.sum() + mask.sum())
        assert back.shape == mask.shape and (size == 16 or dice >= 0.98)
    assert SliceGeometry.from_dict(geometry.as_dict()) == geometry
    with pytest.raises(ValueError, match="expects a"):
        from_model_size(torch.zeros(1, 64, 64), geometry)


def test_reassemble_fills_missing_slices_with_zero():
    plane = torch.ones(plane_shape((4, 5, 3), 1), dtype=torch.uint8)
    volume = reassemble({2: plane * 3}, (4, 5, 3), axis=1)
    assert volume.shape == (4, 5, 3) and volume.dtype == torch.uint8
    assert (volume[:, 2, :] == 3).all() and volume.sum() == 3 * 4 * 3
    with pytest.raises(ValueError, match="expected"):
        reassemble({0: plane}, (4, 5, 3), axis=2)


def test_cached_cases_to_padded_batches(dataset):
    cached = CacheDataset([dataset["item"]], transform=LoadCase(), progress=False)
    data = SliceDataset.from_cases(cached, dataset["card"], axis=2, size=32, empty_ratio=0.5, absent_per_slice=1)
    direct = slice_items(load_case(dataset["item"]), dataset["card"], axis=2, size=32, empty_ratio=0.5)
    assert len(data) == len(direct) and [d["concepts"] for d in data] == [d["concepts"] for d in direct]

    batch = next(iter(DataLoader(data, batch_size=len(data), collate_fn=collate_slices)))
    counts = [len(item["label_ids"]) for item in direct]
    assert len(set(counts)) > 1  # slices with different numbers of concepts
    assert batch["image"].shape == (len(data), 3, 32, 32)
    assert batch["masks"].shape == (len(data), max(counts), 32, 32)
    assert batch["valid"].sum(1).tolist() == counts
    assert (batch["label_ids"][~batch["valid"]] == -1).all() and batch["masks"][~batch["valid"]].sum() == 0
    row = counts.index(min(counts))
    assert batch["label_ids"][row, : counts[row]].tolist() == direct[row]["label_ids"]
    assert batch["present"][row, : counts[row]].tolist() == direct[row]["present"]
    assert batch["concepts"][row] == direct[row]["concepts"] and batch["case_id"][0] == "toy_001"
    assert batch["slice_index"].tolist() == [item["slice_index"] for item in direct]
