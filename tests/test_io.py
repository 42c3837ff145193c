"""Reading scans with their geometry and writing masks back in it: round trips, reorientation, bad input."""
import os

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.data import MetaTensor

from medclipsam.data.io import SimpleITKReader, is_scan_path, list_scans, load_label, load_scan, save_mask, to_ras
from medclipsam.errors import InputError, OutputExistsError

SHAPE = (6, 5, 4)
SPACING = (0.8, 0.9, 2.5)
ORIGIN = (-12.5, 30.0, 100.0)
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def make_affine(axis_signs, rotation=np.eye(3)) -> np.ndarray:
    """Affine with SPACING, ORIGIN and per-axis signs (R/L, A/P, S/I), optionally rotated (oblique)."""
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(np.array(axis_signs, dtype=float) * SPACING)
    affine[:3, 3] = ORIGIN
    return affine.astype(np.float32).astype(np.float64)  # NIfTI stores float32


def oblique_rotation() -> np.ndarray:
    a, b = np.deg2rad(20.0), np.deg2rad(-12.0)
    around_z = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    around_x = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return around_z @ around_x


AFFINES = {
    "RAS": make_affine((1, 1, 1)),
    "LPS": make_affine((-1, -1, 1)),
    "LAS": make_affine((-1, 1, 1)),
    "oblique": make_affine((1, -1, 1), oblique_rotation()),
}


def hu_data() -> np.ndarray:
    return (np.arange(np.prod(SHAPE), dtype=np.int16).reshape(SHAPE) * 7 - 500).astype(np.int16)


def write_nifti(path, data=None, affine=None):
    data = hu_data() if data is None else data
    nib.save(nib.Nifti1Image(data, AFFINES["LPS"] if affine is None else affine), str(path))
    return path


def sitk_image(data: np.ndarray, direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)) -> sitk.Image:
    """SimpleITK image of an (X, Y, Z) array; SimpleITK arrays are (Z, Y, X)."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(2, 1, 0)))
    image.SetSpacing(SPACING)
    image.SetOrigin(ORIGIN)
    image.SetDirection(direction)
    return image


def write_dicom_series(folder, data: np.ndarray, series_uid: str) -> None:
    """One CT DICOM file per axial slice, with the standard geometry tags, as a scanner would write."""
    folder.mkdir(parents=True, exist_ok=True)
    volume = sitk_image(data)
    direction = volume.GetDirection()
    orientation = "\\".join(str(direction[i]) for i in (0, 3, 6, 1, 4, 7))  # row and column cosines
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(volume.GetDepth()):
        slice_image = volume[:, :, k]
        tags = {
            "0008|0060": "CT",
            "0008|0016": "1.2.840.10008.5.1.4.1.1.2",
            "0010|0020": "PHANTOM",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.1",
            "0020|000e": series_uid,
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(str(v) for v in volume.TransformIndexToPhysicalPoint((0, 0, k))),
            "0020|0037": orientation,
            "0018|0050": str(SPACING[2]),
            "0008|0018": f"{series_uid}.{k + 1}",
        }
        for tag, value in tags.items():
            slice_image.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(slice_image)


def files_in(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---- round trips -------------------------------------------------------------------------------------


@pytest.mark.parametrize("orientation", sorted(AFFINES))
def test_nifti_round_trip_keeps_shape_affine_and_data(tmp_path, orientation):
    affine = AFFINES[orientation]
    scan_path = write_nifti(tmp_path / "scan.nii.gz", affine=affine)
    scan = load_scan(scan_path)
    assert isinstance(scan, MetaTensor) and scan.shape == (1, *SHAPE) and scan.dtype == torch.float32
    np.testing.assert_array_equal(scan.affine.numpy(), affine)
    np.testing.assert_array_equal(scan[0].numpy(), hu_data())
    assert scan.meta["filename_or_obj"] == str(scan_path)

    labels = (np.arange(np.prod(SHAPE)).reshape(SHAPE) % 3).astype(np.int64)
    out = save_mask(labels, like=scan, path=tmp_path / "out" / "mask.nii.gz")
    written = nib.load(str(out))
    assert written.shape == SHAPE
    np.testing.assert_array_equal(written.affine, affine)
    np.testing.assert_array_equal(np.asarray(written.dataobj), labels)
    assert written.get_data_dtype() == np.uint8
    assert nib.aff2axcodes(written.affine) == nib.aff2axcodes(affine)


@pytest.mark.parametrize("orientation", sorted(AFFINES))
def test_mask_made_in_ras_overlays_the_original_voxel_for_voxel(tmp_path, orientation):
    scan = load_scan(write_nifti(tmp_path / "scan.nii.gz", affine=AFFINES[orientation]))
    ras = to_ras(scan)
    assert nib.aff2axcodes(ras.affine.numpy()) == ("R", "A", "S")
    mask = (ras > 0).to(torch.uint8)  # the model's output, still carrying the RAS geometry
    out = save_mask(mask, like=scan, path=tmp_path / "mask.nii.gz")
    written = nib.load(str(out))
    np.testing.assert_array_equal(np.asarray(written.dataobj), (hu_data() > 0).astype(np.uint8))
    np.testing.assert_allclose(written.affine, AFFINES[orientation], atol=1e-6)


def test_to_ras_keeps_every_voxel_at_its_world_position(tmp_path):
    scan = load_scan(write_nifti(tmp_path / "scan.nii.gz", affine=AFFINES["LPS"]))
    ras = to_ras(scan)
    assert ras.shape == scan.shape
    for index in [(0, 0, 0), (5, 4, 3), (2, 1, 3), (4, 0, 1)]:
        world = scan.affine.numpy() @ np.array([*index, 1.0])
        ras_index = np.round(np.linalg.inv(ras.affine.numpy()) @ world).astype(int)[:3]
        assert ras[(0, *ras_index)] == scan[(0, *index)]


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_simpleitk_formats_give_the_same_ras_affine_as_nibabel(tmp_path, suffix):
    flipped_and_swapped = (0, -1, 0, 1, 0, 0, 0, 0, 1)  # LPS direction with x and y swapped, one flipped
    image = sitk_image(hu_data(), direction=flipped_and_swapped)
    sitk.WriteImage(image, str(tmp_path / f"scan{suffix}"))
    sitk.WriteImage(image, str(tmp_path / "same.nii.gz"))
    reference = nib.load(str(tmp_path / "same.nii.gz"))

    scan = load_scan(tmp_path / f"scan{suffix}")
    assert scan.shape == (1, *SHAPE)
    np.testing.assert_allclose(scan.affine.numpy(), reference.affine, atol=1e-4)
    np.testing.assert_array_equal(scan[0].numpy(), np.asarray(reference.dataobj))

    out = save_mask(scan[0] > 0, like=scan, path=tmp_path / "mask.nii.gz")
    written = nib.load(str(out))
    assert written.shape == SHAPE
    np.testing.assert_allclose(written.affine, reference.affine, atol=1e-4)


def test_dicom_series_folder_reads_back_and_masks_take_its_geometry(tmp_path):
    data = hu_data()
    folder = tmp_path / "ct_series"
    write_dicom_series(folder, data, series_uid="1.2.826.0.1.3680043.2.1125.7")
    assert is_scan_path(folder)

    scan = load_scan(folder)
    assert scan.shape == (1, *SHAPE)
    np.testing.assert_array_equal(scan[0].numpy(), data)
    affine = scan.affine.numpy()
    np.testing.assert_allclose(np.linalg.norm(affine[:3, :3], axis=0), SPACING, atol=1e-4)
    np.testing.assert_allclose(affine[:3, 3], LPS_TO_RAS[:3, :3] @ ORIGIN, atol=1e-4)
    assert scan.meta["modality"] == "CT"

    out = save_mask(scan[0] > 0, like=folder, path=tmp_path / "mask.nii.gz")
    written = nib.load(str(out))
    assert written.shape == SHAPE
    np.testing.assert_allclose(written.affine, affine, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(written.dataobj), (data > 0).astype(np.uint8))


def test_simpleitk_reader_plugs_into_monai_load_image(tmp_path):
    from monai.transforms import LoadImage

    sitk.WriteImage(sitk_image(hu_data()), str(tmp_path / "scan.mha"))
    image = LoadImage(reader=SimpleITKReader(), image_only=True, ensure_channel_first=True)(tmp_path / "scan.mha")
    assert image.shape == (1, *SHAPE)
    np.testing.assert_allclose(image.affine.numpy()[:3, 3], LPS_TO_RAS[:3, :3] @ ORIGIN, atol=1e-5)


def test_singleton_fourth_axis_is_squeezed(tmp_path):
    path = write_nifti(tmp_path / "scan.nii.gz", data=hu_data()[..., None])
    scan = load_scan(path)
    assert scan.shape == (1, *SHAPE)
    np.testing.assert_array_equal(scan[0].numpy(), hu_data())


def test_load_label_returns_integers_on_the_scan_grid(tmp_path):
    scan = load_scan(write_nifti(tmp_path / "scan.nii.gz"))
    labels = (hu_data() % 4).astype(np.uint8)
    label = load_label(write_nifti(tmp_path / "label.nii.gz", data=labels), like=scan)
    assert label.shape == (1, *SHAPE) and label.dtype == torch.int64
    np.testing.assert_array_equal(label[0].numpy(), labels)
    np.testing.assert_array_equal(label.affine.numpy(), scan.affine.numpy())


def test_mask_dtype_is_the_smallest_unsigned_that_fits(tmp_path):
    scan = load_scan(write_nifti(tmp_path / "scan.nii.gz"))
    labels = np.zeros(SHAPE, dtype=np.int64)
    labels[0, 0, 0] = 300
    written = nib.load(str(save_mask(labels[None], like=scan, path=tmp_path / "big.nii")))
    assert written.get_data_dtype() == np.uint16 and int(np.asarray(written.dataobj).max()) == 300


def test_listing_finds_files_and_dicom_folders(tmp_path):
    write_nifti(tmp_path / "b.nii.gz")
    (tmp_path / "nested").mkdir()
    sitk.WriteImage(sitk_image(hu_data()), str(tmp_path / "nested" / "a.nrrd"))
    write_dicom_series(tmp_path / "nested" / "series", hu_data(), "1.2.3.4")
    (tmp_path / "notes.txt").write_text("not a scan")
    (tmp_path / "empty_folder").mkdir()
    expected = [tmp_path / "b.nii.gz", tmp_path / "nested" / "a.nrrd", tmp_path / "nested" / "series"]
    assert list_scans(tmp_path) == expected
    assert not is_scan_path(tmp_path / "notes.txt") and not is_scan_path(tmp_path / "empty_folder")


# ---- bad input -----------------------------------------------------------------------------------------


def assert_input_error(path, *words):
    with pytest.raises(InputError) as info:
        load_scan(path)
    message = str(info.value)
    assert os.path.basename(str(path)) in message
    for word in words:
        assert word in message
    return message


def test_missing_path(tmp_path):
    assert_input_error(tmp_path / "nowhere.nii.gz", "does not exist")


def test_truncated_nifti(tmp_path):
    noise = np.random.default_rng(0).integers(-1000, 1000, (40, 40, 20), dtype=np.int16)
    path = write_nifti(tmp_path / "cut.nii.gz", data=noise)
    path.write_bytes(path.read_bytes()[:2000])
    assert_input_error(path, "unreadable or truncated", "NIfTI")


def test_garbage_nrrd(tmp_path):
    path = tmp_path / "noise.nrrd"
    path.write_bytes(b"this is not an image\n" * 10)
    assert_input_error(path, "unreadable or truncated")


def test_unsupported_extension(tmp_path):
    path = tmp_path / "photo.png"
    path.write_bytes(b"\x89PNG")
    assert_input_error(path, "unsupported file type", ".png")


def test_single_dicom_file_asks_for_the_folder(tmp_path):
    write_dicom_series(tmp_path / "series", hu_data(), "1.2.3.5")
    assert_input_error(tmp_path / "series" / "slice000.dcm", "single DICOM file", "folder")


def test_2d_image(tmp_path):
    assert_input_error(write_nifti(tmp_path / "flat.nii.gz", data=hu_data()[:, :, 0]), "2D")


def test_4d_image_with_several_volumes(tmp_path):
    path = write_nifti(tmp_path / "timeseries.nii.gz", data=np.stack([hu_data()] * 3, axis=-1))
    assert_input_error(path, "4D", "3 volumes")


def test_nan_and_inf_are_counted(tmp_path):
    data = hu_data().astype(np.float32)
    data[0, 0, 0] = data[1, 1, 1] = np.nan
    data[2, 2, 2] = np.inf
    assert_input_error(write_nifti(tmp_path / "nan.nii.gz", data=data), "2 NaN", "1 infinite")


def test_folder_without_dicom_files(tmp_path):
    folder = tmp_path / "empty_series"
    folder.mkdir()
    (folder / "readme.txt").write_text("nothing here")
    assert_input_error(folder, "no DICOM files")


def test_folder_with_two_dicom_series_lists_them(tmp_path):
    folder = tmp_path / "mixed"
    write_dicom_series(folder, hu_data(), "1.2.826.0.1.11")
    write_dicom_series(folder / "x", hu_data(), "1.2.826.0.1.22")
    for f in (folder / "x").iterdir():
        f.rename(folder / f"other_{f.name}")
    assert_input_error(folder, "2 DICOM series", "1.2.826.0.1.11", "1.2.826.0.1.22")


def test_label_with_other_shape_or_affine_names_both_files(tmp_path):
    scan = load_scan(write_nifti(tmp_path / "scan.nii.gz"))
    wrong_shape = write_nifti(tmp_path / "label_shape.nii.gz", data=np.zeros((6, 5, 3), np.uint8))
    with pytest.raises(InputError, match=r"label_shape\.nii\.gz.*\(6, 5, 3\).*scan\.nii\.gz.*\(6, 5, 4\)"):
        load_label(wrong_shape, like=scan)
    shifted = AFFINES["LPS"].copy()
    shifted[0, 3] += 0.5
    wrong_affine = write_nifti(tmp_path / "label_affine.nii.gz", data=np.zeros(SHAPE, np.uint8), affine=shifted)
    with pytest.raises(InputError, match=r"label_affine\.nii\.gz.*affine.*scan\.nii\.gz"):
        load_label(wrong_affine, like=scan)


def test_label_with_fractional_values(tmp_path):
    scan = load_scan(write_nifti(tmp_path / "scan.nii.gz"))
    soft = write_nifti(tmp_path / "soft.nii.gz", data=np.full(SHAPE, 0.5, np.float32))
    with pytest.raises(InputError, match=r"soft\.nii\.gz.*non-integer"):
        load_label(soft, like=scan)


# ---- writing safely --------------------------------------------------------------------------------------


def test_refuses_to_write_over_the_input_even_with_overwrite(tmp_path):
    scan_path = write_nifti(tmp_path / "scan.nii.gz")
    before = scan_path.read_bytes()
    scan = load_scan(scan_path)
    os.symlink(scan_path, tmp_path / "alias.nii.gz")
    for target in (scan_path, tmp_path / "alias.nii.gz"):
        with pytest.raises(OutputExistsError, match="scan.nii.gz"):
            save_mask(np.zeros(SHAPE, np.uint8), like=scan, path=target, overwrite=True)
    assert scan_path.read_bytes() == before
    assert files_in(tmp_path) == ["alias.nii.gz", "scan.nii.gz"]


def test_existing_output_is_kept_unless_overwrite(tmp_path):
    scan = load_scan(write_nifti(tmp_path / "scan.nii.gz"))
    out = save_mask(np.ones(SHAPE, np.uint8), like=scan, path=tmp_path / "mask.nii.gz")
    before = out.read_bytes()
    with pytest.raises(OutputExistsError, match=r"mask\.nii\.gz.*overwrite"):
        save_mask(np.full(SHAPE, 2, np.uint8), like=scan, path=out)
    assert out.read_bytes() == before
    save_mask(np.full(SHAPE, 2, np.uint8), like=scan, path=out, overwrite=True)
    assert np.all(np.asarray(nib.load(str(out)).dataobj) == 2)
    assert files_in(tmp_path) == ["mask.nii.gz", "scan.nii.gz"]


def test_failed_write_leaves_no_temp_file_and_no_output(tmp_path, monkeypatch):
    scan = load_scan(write_nifti(tmp_path / "scan.nii.gz"))

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr("medclipsam.data.io.os.replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        save_mask(np.ones(SHAPE, np.uint8), like=scan, path=tmp_path / "mask.nii.gz")
    assert files_in(tmp_path) == ["scan.nii.gz"]


@pytest.mark.parametrize(
    "mask, problem",
    [
        (np.zeros((6, 5, 3), np.uint8), "shape"),
        (np.full(SHAPE, 0.5, np.float32), "non-integer"),
        (np.full(SHAPE, -1, np.int16), "negative"),
        (np.zeros((2, *SHAPE), np.uint8), "shape"),
    ],
)
def test_bad_mask_is_refused_before_anything_is_written(tmp_path, mask, problem):
    scan = load_scan(write_nifti(tmp_path / "scan.nii.gz"))
    with pytest.raises(InputError, match=problem) as info:
        save_mask(mask, like=scan, path=tmp_path / "mask.nii.gz")
    assert "mask.nii.gz" in str(info.value)
    assert files_in(tmp_path) == ["scan.nii.gz"]


def test_metatensor_mask_on_another_grid_is_refused(tmp_path):
    scan = load_scan(write_nifti(tmp_path / "scan.nii.gz"))
    elsewhere = MetaTensor(torch.zeros(1, *SHAPE), affine=torch.eye(4, dtype=torch.float64))
    with pytest.raises(InputError, match="not on the voxel grid"):
        save_mask(elsewhere, like=scan, path=tmp_path / "mask.nii.gz")
    assert files_in(tmp_path) == ["scan.nii.gz"]


def test_output_must_be_nifti(tmp_path):
    scan = load_scan(write_nifti(tmp_path / "scan.nii.gz"))
    with pytest.raises(InputError, match=r"mask\.nrrd.*NIfTI"):
        save_mask(np.zeros(SHAPE, np.uint8), like=scan, path=tmp_path / "mask.nrrd")
