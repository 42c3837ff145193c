"""The one predictor: scan in any orientation -> frame -> model -> labels back on the scan's own grid; encodings
cached per slice and shared by every concept and every later call; prompts placed where the user put them."""
import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from medclipsam.data.frame import FrameSettings
from medclipsam.data.io import load_scan, to_ras
from medclipsam.data.phantom import make_phantom
from medclipsam.errors import InputError
from medclipsam.inference.predictor import TEST_TIME_VIEWS, Predictor, amp_dtype
from medclipsam.models.clip_guided_sam import CLIPGuidedSAM, CLIPGuidedSAMConfig
from medclipsam.models.prompts import SlicePrompts
from medclipsam.models.organ_offsets import OrganOffsets
from medclipsam.models.slice_gate import FEATURES, OrganGate, SliceGate


class IntensityModel(nn.Module):
    """A stand-in model: concept k is every pixel whose windowed grey value lies in its interval; counts encodings."""

    def __init__(self, intervals: dict[str, tuple[float, float]]) -> None:
        super().__init__()
        self.intervals = intervals
        self.frame = FrameSettings(size=64, field_of_view_mm=160.0)  # 2.5 mm pixels, finer than the scans' 3 mm
        self.weight = nn.Parameter(torch.zeros(()))
        self.encoded = 0

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        self.encoded += len(images)
        return images[:, :1]

    def segment(self, features: torch.Tensor, concepts, prompts: SlicePrompts | None):
        probs = torch.stack([((features[:, 0] >= self.intervals[c][0]) & (features[:, 0] <= self.intervals[c][1]))
                             for c in concepts], dim=1).float()
        if prompts is not None:  # a prompted pair: the interval, inside its box or within 3 pixels of its points
            boxes = torch.nan_to_num(prompts.boxes, nan=-1.0)
            ys, xs = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
            inside = ((xs >= boxes[..., 0, None, None]) & (xs <= boxes[..., 2, None, None])
                      & (ys >= boxes[..., 1, None, None]) & (ys <= boxes[..., 3, None, None]))
            for p in range(prompts.points.shape[2]):
                point, given = prompts.points[:, :, p], prompts.point_labels[:, :, p] == 1
                near = (xs - point[..., 0, None, None]) ** 2 + (ys - point[..., 1, None, None]) ** 2 <= 9
                inside |= near & given[..., None, None]
            probs = probs * inside * prompts.active[..., None, None]
        return probs, torch.full(probs.shape[:2], 0.9)


def lps_scan(tmp_path, name="ct.nii.gz"):
    """A 40 x 36 x 6 LPS-oriented scan: a 'liver' block (60 HU) and a 'bone' block (700 HU) in soft tissue."""
    image = np.full((40, 36, 6), -1000, np.int16)
    image[4:36, 4:32, :] = 0
    image[8:20, 10:24, 1:5] = 60
    image[24:30, 12:18, :] = 700
    affine = np.diag([-3.0, -3.5, 5.0, 1.0])
    affine[:3, 3] = (50.0, 60.0, -10.0)
    path = tmp_path / name
    nib.save(nib.Nifti1Image(image, affine), path)
    return path, image


INTERVALS = {"liver": (0.45, 0.6), "bone": (0.95, 1.0)}  # abdomen window: 60 HU -> 0.55, 700 HU -> 1.0


def test_text_only_labels_land_on_the_scans_own_grid(tmp_path):
    path, image = lps_scan(tmp_path)
    predictor = Predictor(IntensityModel(INTERVALS), device="cpu")
    predictor.set_volume(path)
    result = predictor.predict(["liver", "bone"])
    written = nib.load(result.save(tmp_path / "labels.nii.gz"))
    scan = nib.load(path)
    assert written.shape == scan.shape and np.allclose(written.affine, scan.affine)
    labels = np.asarray(written.dataobj)
    assert ((labels == 1) == (image == 60)).mean() > 0.99 and ((labels == 2) == (image == 700)).mean() > 0.99
    assert result.confidence == {"liver": pytest.approx(0.9), "bone": pytest.approx(0.9)}
    recoded = nib.load(result.save(tmp_path / "card.nii.gz", values={"liver": 5, "bone": 25}))
    assert set(np.unique(np.asarray(recoded.dataobj)).tolist()) == {0, 5, 25}


def _liver_box(path) -> tuple[int, ...]:
    """The 3D box (voxels of the scan as RAS) around the liver's grey value."""
    xs, ys, zs = np.nonzero(np.asarray(to_ras(load_scan(path))[0]) == 60)
    return int(xs.min()), int(ys.min()), int(zs.min()), int(xs.max()), int(ys.max()), int(zs.max())


def test_the_models_slice_gate_drops_text_only_slices_unless_turned_off(tmp_path):
    path, _ = lps_scan(tmp_path)
    model = IntensityModel(INTERVALS)
    never = OrganGate(np.zeros(len(FEATURES)), np.ones(len(FEATURES)), np.zeros(len(FEATURES)), -10.0)
    model.slice_gate = SliceGate({"liver": never}, threshold=0.5, min_span_mm=0.0, provenance={})
    gated = Predictor(model, device="cpu")
    gated.set_volume(path)
    result = gated.predict(["liver", "bone"])
    assert not result.mask("liver").any() and result.mask("bone").any()  # only the gated concept loses slices
    assert gated.predict(["liver"], boxes={"liver": _liver_box(path)}).mask("liver").any()  # prompts are never gated
    plain = Predictor(model, device="cpu", slice_gate=False)
    plain.set_volume(path)
    assert plain.predict(["liver", "bone"]).mask("liver").any()


def test_the_models_organ_offsets_move_text_only_thresholds_unless_turned_off(tmp_path):
    path, _ = lps_scan(tmp_path)
    model = IntensityModel(INTERVALS)
    model.organ_offsets = OrganOffsets({"liver": -20.0}, provenance={})  # the liver's threshold beyond any probability
    offset = Predictor(model, device="cpu")
    offset.set_volume(path)
    result = offset.predict(["liver", "bone"])
    assert not result.mask("liver").any() and result.mask("bone").any()  # only the offset concept moves
    assert offset.predict(["liver"], boxes={"liver": _liver_box(path)}).mask("liver").any()  # prompts are never offset
    plain = Predictor(model, device="cpu", organ_offsets=False)
    plain.set_volume(path)
    assert plain.predict(["liver", "bone"]).mask("liver").any()


def test_each_slice_is_encoded_once_for_every_concept_and_call(tmp_path):
    path, _ = lps_scan(tmp_path)
    model = IntensityModel(INTERVALS)
    predictor = Predictor(model, device="cpu", batch_size=4)
    predictor.set_volume(path)
    first = predictor.predict(["liver", "bone"])
    assert model.encoded == 6  # six slices, two concepts: one encoding each
    predictor.predict(["bone"])
    refined = predictor.refine(first, "liver", box=(8, 10, 2, 19, 23, 3))  # RAS voxels: a box on two slices
    assert model.encoded == 6
    liver_slices = np.flatnonzero(refined.mask("liver").any(axis=(0, 1)))
    assert liver_slices.tolist() == [2, 3]  # only where the box was drawn
    np.testing.assert_array_equal(refined.mask("bone"), first.mask("bone"))  # the other concept is untouched
    liver = first.mask("liver")
    clicked = predictor.refine(first, "liver", points=[(12, 15, 4)])  # one click: slice 4 redone, the rest kept
    kept = [z for z in range(liver.shape[2]) if z != 4]
    np.testing.assert_array_equal(clicked.mask("liver")[:, :, kept], liver[:, :, kept])
    assert clicked.mask("liver")[:, :, 4].sum() < liver[:, :, 4].sum()  # near the click only
    np.testing.assert_array_equal(clicked.mask("bone"), first.mask("bone"))
    predictor.set_volume(path)
    predictor.predict(["liver"])
    assert model.encoded == 12  # a new scan: encoded again


def test_test_time_views_are_averaged_back_on_the_frame_and_only_the_models_own_view_is_kept(tmp_path):
    """With test-time augmentation each slice is also seen scaled and moved; a model that sees the same anatomy in
    every view gives the masks it gives without, each view is encoded once, and boxes keep their one view."""
    path, image = lps_scan(tmp_path)
    plain = Predictor(IntensityModel(INTERVALS), device="cpu")
    plain.set_volume(path)
    reference = plain.predict(["liver", "bone"])
    model, seen = IntensityModel(INTERVALS), []
    predictor = Predictor(model, device="cpu", test_time_augmentation=True, progress=lambda *p: seen.append(p))
    predictor.set_volume(path)
    result = predictor.predict(["liver", "bone"])
    views = len(TEST_TIME_VIEWS)
    assert views == 5 and model.encoded == 6 * views
    assert seen[-1] == (6 * views, 6 * views) and [d for d, _ in seen] == sorted(d for d, _ in seen)
    for concept in ("liver", "bone"):
        found, expected = result.mask(concept), reference.mask(concept)
        assert expected.sum() > 100
        assert 2 * (found & expected).sum() / (found.sum() + expected.sum()) > 0.97, concept
    assert result.confidence == {"liver": pytest.approx(0.9), "bone": pytest.approx(0.9)}
    predictor.predict(["bone"])
    assert model.encoded == 6 * views + 6 * (views - 1)  # the model's own view stays cached, the moved ones do not
    boxed = predictor.predict(["liver"], boxes={"liver": (8, 10, 2, 19, 23, 3)})
    assert model.encoded == 6 * views + 6 * (views - 1)  # a prompt is answered in the model's own view only
    assert np.flatnonzero(boxed.mask("liver").any(axis=(0, 1))).tolist() == [2, 3]


def test_boxes_prompt_only_the_slices_and_area_they_cover(tmp_path):
    path, image = lps_scan(tmp_path)
    predictor = Predictor(IntensityModel(INTERVALS), device="cpu")
    predictor.set_volume(path)
    ras = to_ras(load_scan(path))
    liver = np.asarray(ras[0]) == 60
    xs, ys, zs = np.nonzero(liver)
    half = (int(xs.min()), int(ys.min()), 2, int((xs.min() + xs.max()) // 2), int(ys.max()), 3)
    result = predictor.predict(["liver", "bone"], boxes={"liver": half})
    found = result.mask("liver")
    assert found.any() and not found[..., [0, 1, 4, 5]].any()
    assert not found[half[3] + 2:].any()  # nothing beyond the box's x extent
    assert result.mask("bone").any()  # concepts without a box stay text-only


def test_points_prompt_the_slice_and_the_place_they_lie_on(tmp_path):
    path, _ = lps_scan(tmp_path)
    predictor = Predictor(IntensityModel(INTERVALS), device="cpu")
    predictor.set_volume(path)
    ras_liver = np.argwhere(np.asarray(to_ras(load_scan(path))[0]) == 60)
    point = tuple(int(v) for v in ras_liver.min(axis=0) + 2)  # near the liver's corner, on its second slice
    result = predictor.predict(["liver"], points={"liver": [point]})
    found = result.mask("liver")
    assert np.flatnonzero(found.any(axis=(0, 1))).tolist() == [point[2]]
    assert found[point] and 0 < found.sum() < 30  # around the click only (3 frame pixels = 7.5 mm)
    off = predictor.predict(["liver"], points={"liver": [(*point[:3], 0)]})  # a negative click alone: nothing
    assert not off.mask("liver").any()


def test_litemedsam_boxes_segment_a_phantom_organ_in_its_own_geometry(tmp_path):
    phantom = make_phantom(5, shape=(96, 80, 16), spacing=(4.0, 4.5, 10.0))
    phantom.to_nifti(tmp_path / "ct.nii.gz", tmp_path / "truth.nii.gz")
    model = CLIPGuidedSAM(CLIPGuidedSAMConfig()).eval()
    predictor = Predictor(model, device="cpu")
    predictor.set_volume(tmp_path / "ct.nii.gz")
    truth = phantom.label == 1
    xs, ys, zs = np.nonzero(truth)
    middle = int(np.median(zs))
    box = (int(xs.min()), int(ys.min()), middle - 1, int(xs.max()), int(ys.max()), middle + 1)
    result = predictor.predict(["liver"], boxes={"liver": box})
    found = result.mask("liver")
    assert np.flatnonzero(found.any(axis=(0, 1))).tolist() == [middle - 1, middle, middle + 1]
    inside = slice(middle - 1, middle + 2)
    overlap = 2 * (found[..., inside] & truth[..., inside]).sum() / (found[..., inside].sum() + truth[..., inside].sum())
    assert overlap > 0.85 and 0.5 < result.confidence["liver"] <= 1.0


def test_mixed_precision_is_chosen_per_device_and_boxes_run_in_full_precision_on_the_cpu(tmp_path):
    """AMP runs text-only concepts in bfloat16 on a CPU with AMX tiles (about 1.4x faster with LiteMedSAM on this
    project's machines); prompted ones stay in full precision there, so manual mode gives the backbone's own masks."""
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    assert amp_dtype(torch.device("cpu")) == (torch.bfloat16 if amx else None)
    assert amp_dtype(torch.device("cuda")) == torch.float16
    phantom = make_phantom(5, shape=(96, 80, 8), spacing=(4.0, 4.5, 10.0))
    phantom.to_nifti(tmp_path / "ct.nii.gz", tmp_path / "truth.nii.gz")
    model = CLIPGuidedSAM(CLIPGuidedSAMConfig()).eval()
    xs, ys, _ = np.nonzero(phantom.label == 1)
    box = (int(xs.min()), int(ys.min()), 2, int(xs.max()), int(ys.max()), 5)
    masks = {}
    for amp in (False, True):
        predictor = Predictor(model, device="cpu", amp=amp)
        predictor.set_volume(tmp_path / "ct.nii.gz")
        masks[amp] = predictor.predict(["liver"], boxes={"liver": box}).mask("liver")
    assert masks[False].sum() > 100 and np.array_equal(masks[False], masks[True])


def test_misuse_gets_clear_errors(tmp_path):
    path, _ = lps_scan(tmp_path)
    predictor = Predictor(IntensityModel(INTERVALS), device="cpu")
    with pytest.raises(InputError, match="no scan is set"):
        predictor.predict(["liver"])
    predictor.set_volume(path)
    with pytest.raises(InputError, match="not among the concepts"):
        predictor.predict(["liver"], boxes={"bone": (0, 0, 0, 3, 3, 3)})
    with pytest.raises(InputError, match="no concept"):
        predictor.predict([])
    result = predictor.predict(["liver"])
    with pytest.raises(InputError, match="needs a box or a point"):
        predictor.refine(result, "liver")
    with pytest.raises(InputError, match="not in this segmentation"):
        predictor.refine(result, "bone", box=(0, 0, 0, 3, 3, 3))
    with pytest.raises(InputError, match="batch size"):
        Predictor(IntensityModel(INTERVALS), batch_size=0)
