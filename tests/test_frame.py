"""The model's physical frame: body-centred, fixed mm per pixel whatever the scanner's grid, and its exact way back."""
import dataclasses

import numpy as np
import pytest
import torch

from medclipsam.data.frame import FrameSettings, body_centre, fit_frame, voxel_spacing
from medclipsam.data.phantom import ScannerGeometry, make_scanner_phantom
from medclipsam.errors import InputError

SETTINGS = FrameSettings(size=128, field_of_view_mm=400.0)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


def body_with_table(shape=(120, 100, 6), spacing=(2.0, 2.5, 5.0), centre=(70.0, 55.0)) -> tuple[np.ndarray, np.ndarray]:
    """Air, an elliptic 'body' at `centre` (voxels) and a wide table slab touching it underneath (posterior)."""
    x, y = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    body = ((x - centre[0]) * spacing[0] / 100) ** 2 + ((y - centre[1]) * spacing[1] / 70) ** 2 < 1
    table = (np.abs(y * spacing[1] - (centre[1] * spacing[1] - 76)) < 6)  # a 12 mm slab under the body, full width
    volume = np.full(shape, -1000.0, np.float32)
    volume[body] = 40.0
    volume[table & ~body] = 200.0
    affine = np.diag([*spacing, 1.0])
    return volume, affine


def test_the_frame_centres_on_the_body_and_ignores_the_table():
    volume, affine = body_with_table()
    frame = fit_frame(volume, SETTINGS, affine)
    centre = frame.frame_indices(np.array([[70.0, 55.0, 2.0]]))[0]
    half = (SETTINGS.size - 1) / 2
    assert abs(centre[0] - half) < 1.5 and abs(centre[1] - half) < 3.5  # within ~5 mm of the body's centre
    assert centre[2] == pytest.approx(2.0)
    x, y = body_centre(volume, voxel_spacing(affine), SETTINGS)
    assert (x, y) == pytest.approx((70.0, 55.0), abs=2.5)


def test_a_blank_scan_gets_the_volume_centre():
    volume = np.full((30, 40, 3), 40.0, np.float32)  # no air anywhere: everything is "body", centred (to the 4 mm
    assert body_centre(volume, np.ones(3), SETTINGS) == pytest.approx((14.5, 19.5), abs=2.0)  # grid it is found on)
    empty = np.full((30, 40, 3), -1000.0, np.float32)
    assert body_centre(empty, np.ones(3), SETTINGS) == pytest.approx((14.5, 19.5))


def test_pixels_are_millimetres_and_slices_are_in_viewing_orientation():
    volume = np.full((60, 50, 4), -1000.0, np.float32)
    volume[10:50, 5:45, :] = 0.0  # a body
    volume[45, 40, 2] = 1000.0  # a bright voxel to the patient's right (high x) and anterior (high y)
    affine = np.diag([3.0, 3.0, 4.0, 1.0])
    frame = fit_frame(volume, SETTINGS, affine)
    slices = frame.slices(torch.from_numpy(volume)[None], pad=-1024.0)
    assert slices.shape == (4, 1, 128, 128)
    column, row, depth = frame.frame_indices(np.array([[45.0, 40.0, 2.0]]))[0]
    bright = torch.nonzero(slices[2, 0] == slices[2, 0].max())[0].tolist()
    assert bright == [round(row), round(column)] and depth == 2.0
    assert column < 64 and row < 64  # right of the patient -> left of the image; anterior -> top
    assert float(slices[0, 0, 0, 0]) == pytest.approx(-1024.0)  # outside the scan: the pad value
    body_pixels = float((slices[0, 0] > -500).sum()) * SETTINGS.pixel_mm ** 2
    assert body_pixels == pytest.approx(40 * 40 * 9.0, rel=0.06)  # 120 x 120 mm whatever the grid


def test_labels_come_back_to_the_scan_grid_exactly():
    """With frame pixels finer than the scan's (0.78 mm vs 1.7 x 2.3 mm), a label map goes there and back intact."""
    volume, affine = body_with_table(shape=(90, 70, 5), spacing=(1.7, 2.3, 4.0), centre=(45.0, 35.0))
    x, y = np.meshgrid(np.arange(90), np.arange(70), indexing="ij")
    organ = (((x - 40) / 12.0) ** 2 + ((y - 30) / 9.0) ** 2 < 1)[..., None] & np.ones(5, bool)
    other = (((x - 60) / 6.0) ** 2 + ((y - 40) / 8.0) ** 2 < 1)[..., None] & np.ones(5, bool)
    labels = organ.astype(np.float32) + 2 * other
    frame = fit_frame(volume, FrameSettings(size=256, field_of_view_mm=200.0), affine)
    framed = frame.slices(torch.from_numpy(labels)[None], nearest=True)[:, 0]
    probabilities = torch.stack([framed == 1, framed == 2], dim=1).float()
    back = frame.labels_to_source(probabilities)
    assert back.shape == labels.shape
    np.testing.assert_array_equal(back, labels.astype(np.uint8))


def test_working_slice_spacing_resamples_z_and_maps_back():
    volume, affine = body_with_table(shape=(60, 50, 40), spacing=(4.0, 4.0, 0.75), centre=(30.0, 25.0))
    z = np.arange(40)
    organ = np.zeros(volume.shape, bool)
    organ[20:40, 15:35, 8:31] = True
    frame = fit_frame(volume, dataclasses.replace(SETTINGS, slice_spacing_mm=3.0), affine)
    assert frame.slice_count == 11 and frame.slice_mm == pytest.approx(39 * 0.75 / 10)
    framed = frame.slices(torch.from_numpy(organ.astype(np.float32))[None])[:, 0]
    back = frame.labels_to_source((framed > 0.5).float()[:, None])
    assert dice(back == 1, organ) > 0.93
    assert frame.frame_indices(np.array([[0, 0, 39.0]]))[0, 2] == pytest.approx(10.0)
    assert z.size == 40


def test_the_same_patient_at_two_scanner_geometries_looks_the_same_in_the_frame():
    base = dict(slices=4, z_centre_mm=30.0, table="curved", pad_mm=0.0, gap_mm=8.0, phase="portal venous",
                noise_hu=5.0)
    small = ScannerGeometry(matrix=512, pixel_mm=0.62, slice_mm=5.0, arms="up", offset_mm=(30.0, -10.0), **base)
    large = ScannerGeometry(matrix=256, pixel_mm=1.95, slice_mm=5.0, arms="down", offset_mm=(-25.0, 20.0), **base)
    framed = []
    for geometry in (small, large):
        phantom = make_scanner_phantom(7, geometry)
        frame = fit_frame(phantom.image, SETTINGS, phantom.affine)
        framed.append(frame.slices(torch.from_numpy(phantom.label.astype(np.float32))[None], nearest=True)[:, 0])
    for organ in (1, 2, 5, 6):  # liver, spleen, aorta, stomach: same size, same place (mm) in both frames
        masks = [(f == organ).numpy() for f in framed]
        areas = [m.sum() for m in masks]
        assert min(areas) > 100, organ
        centres = [np.argwhere(m).mean(axis=0)[1:] * SETTINGS.pixel_mm for m in masks]
        assert areas[1] == pytest.approx(areas[0], rel=0.1), organ
        assert np.linalg.norm(centres[0] - centres[1]) < 10.0, organ


def test_a_moved_view_sees_the_same_anatomy_and_maps_back_onto_the_frame():
    """Test-time views: the frame scaled about its centre and moved by whole pixels shows the same anatomy in other
    frame pixels, and its values resampled into the frame agree with the frame's own where it covers them."""
    volume, affine = body_with_table()
    organ = np.zeros(volume.shape, np.float32)
    organ[60:80, 45:60, :] = 1.0
    frame = fit_frame(volume, SETTINGS, affine)
    own = frame.slices(torch.from_numpy(organ)[None])
    shifted = frame.moved(1.0, (3.0, -2.0))
    assert shifted.frame_indices(np.array([[70.0, 50.0, 2.0]]))[0] == pytest.approx(
        frame.frame_indices(np.array([[70.0, 50.0, 2.0]]))[0] - [3.0, -2.0, 0.0])
    zoomed = frame.moved(0.9)
    assert zoomed.settings == frame.settings and zoomed.slice_count == frame.slice_count
    centre = (SETTINGS.size - 1) / 2
    corner = frame.columns.to_source(0.0), frame.rows.to_source(0.0)
    zoomed_corner = zoomed.frame_indices(np.array([[*corner, 0.0]]))[0, :2]
    assert zoomed_corner == pytest.approx([centre - centre / 0.9] * 2)  # the frame's corner lies outside the view
    for view, tolerance in ((shifted, 1e-5), (zoomed, 0.002), (frame.moved(1.1, (-3.0, 3.0)), 0.002)):
        back, covered = frame.resample_from(view, view.slices(torch.from_numpy(organ)[None]))
        inside = covered > 0.999
        assert inside.float().mean() > 0.8
        assert float((back - own).abs()[..., inside].mean()) < tolerance  # whole-pixel moves are exact
        assert dice((back[..., inside] > 0.5).numpy(), (own[..., inside] > 0.5).numpy()) > 0.99
    _, covered = frame.resample_from(zoomed, zoomed.slices(torch.from_numpy(organ)[None]))
    assert float(covered[0, 0]) == 0.0 and float(covered[64, 64]) == 1.0  # a zoomed-in view misses the corners


def test_scan_fit_reproduces_the_longest_side_resize():
    volume = np.zeros((40, 20, 2), np.float32)
    volume[:, :, :] = np.arange(40)[:, None, None]
    frame = fit_frame(volume, FrameSettings(size=80, fit="scan"), np.diag([1.0, 3.0, 2.0, 1.0]))
    slices = frame.slices(torch.from_numpy(volume)[None])
    # 40 x 20 voxels -> 80 x 40 frame pixels whatever the mm (pixels treated as square), padded below
    assert float(slices[0, 0, 0, 1]) == pytest.approx(39 - 0.25, abs=1e-4)  # half-pixel centres, as torch resizes
    assert float(slices[0, 0, 50:, :].abs().max()) < 1e-6  # the bottom half is padding


def test_settings_are_checked_and_round_trip():
    settings = FrameSettings(size=256, field_of_view_mm=350.0, slice_spacing_mm=3.0, modality="MR", window=None)
    assert FrameSettings.from_dict(settings.to_dict()) == settings
    assert settings.pixel_mm == pytest.approx(350 / 256)
    with pytest.raises(InputError, match="unknown frame settings"):
        FrameSettings.from_dict({**settings.to_dict(), "zoom": 2})
    with pytest.raises(InputError, match="fit"):
        FrameSettings(fit="crop")
    with pytest.raises(InputError, match="needs a 3D volume"):
        fit_frame(np.zeros((4, 4)), SETTINGS, np.eye(4))
