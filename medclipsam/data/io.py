"""Read scans and labels with their geometry, reorient to RAS, and write masks back in the input's own geometry.

NIfTI goes through MONAI's NibabelReader; NRRD/MHA/MHD files and DICOM series folders through
`SimpleITKReader` below (MONAI's ITKReader needs the `itk` package, which we do not ship).
Affines are 4x4 and RAS, as in nibabel and MONAI.
"""
from __future__ import annotations

import functools
import os
import secrets
from pathlib import Path
from typing import Any, Sequence

import nibabel as nib
import numpy as np
import SimpleITK as sitk
import torch
from monai.data import ImageReader, MetaTensor, NibabelReader
from monai.transforms import LoadImage, Orientation
from monai.utils import ImageMetaKey, MetaKeys, SpaceKeys

from medclipsam.errors import InputError, OutputExistsError

NIFTI_SUFFIXES = (".nii.gz", ".nii")
SIMPLEITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
SUPPORTED_FORMATS = (
    "NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd) or a folder with one DICOM series"
)
AFFINE_ATOL_MM = 1e-3
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_DICOM_MODALITY_TAG = "0008|0060"


def _matching_suffix(name: str, suffixes: Sequence[str]) -> str | None:
    lowered = name.lower()
    return next((s for s in suffixes if lowered.endswith(s)), None)


def _has_dicom_files(folder: Path) -> bool:
    """True if the folder directly holds at least one DICOM file (.dcm name or the 'DICM' preamble marker)."""
    for entry in folder.iterdir():
        if entry.name.startswith(".") or not entry.is_file():
            continue
        if entry.name.lower().endswith(".dcm"):
            return True
        with open(entry, "rb") as handle:
            if handle.read(132)[128:132] == b"DICM":
                return True
    return False


def _read_dicom_series(folder: Path) -> sitk.Image:
    series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series_ids:
        raise InputError(
            folder,
            "holds no readable DICOM series",
            f"Pass a folder with one DICOM series or a file: {SUPPORTED_FORMATS}",
        )
    if len(series_ids) > 1:
        raise InputError(
            folder,
            f"holds {len(series_ids)} DICOM series ({', '.join(series_ids)})",
            "Move each series (SeriesInstanceUID, tag 0020|000e) into its own folder and pass that folder",
        )
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_ids[0]))
    reader.MetaDataDictionaryArrayUpdateOn()
    image = reader.Execute()
    if reader.HasMetaDataKey(0, _DICOM_MODALITY_TAG):
        image.SetMetaData(_DICOM_MODALITY_TAG, reader.GetMetaData(0, _DICOM_MODALITY_TAG).strip())
    return image


def _ras_affine(image: sitk.Image) -> np.ndarray:
    """4x4 RAS affine of a SimpleITK image (ITK's direction and origin are LPS)."""
    ndim = image.GetDimension()
    spatial = min(ndim, 3)
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(ndim, ndim)[:spatial, :spatial]
    lps = np.eye(4)
    lps[:spatial, :spatial] = direction * np.asarray(image.GetSpacing()[:spatial], dtype=np.float64)
    lps[:spatial, 3] = image.GetOrigin()[:spatial]
    return _LPS_TO_RAS @ lps


class SimpleITKReader(ImageReader):
    """MONAI image reader for NRRD/MHA/MHD files and DICOM series folders through SimpleITK, with a RAS affine."""

    def verify_suffix(self, filename: Sequence[str | os.PathLike] | str | os.PathLike) -> bool:
        """True if every name is a NRRD/MetaImage file or a folder (read as one DICOM series)."""
        names = [filename] if isinstance(filename, (str, os.PathLike)) else list(filename)
        return all(Path(n).is_dir() or _matching_suffix(str(n), SIMPLEITK_SUFFIXES) for n in names)

    def read(self, data: Sequence[str | os.PathLike] | str | os.PathLike, **kwargs: Any) -> sitk.Image:
        """Read one image file or one DICOM series folder into a SimpleITK image."""
        names = [data] if isinstance(data, (str, os.PathLike)) else list(data)
        if len(names) != 1:
            raise ValueError(f"SimpleITKReader reads one image at a time, got {len(names)}: {names}")
        path = Path(names[0])
        return _read_dicom_series(path) if path.is_dir() else sitk.ReadImage(str(path))

    def get_data(self, img: sitk.Image) -> tuple[np.ndarray, dict]:
        """Array in (X, Y, Z[, T][, components]) order and MONAI metadata with a RAS affine."""
        ndim = img.GetDimension()
        array = sitk.GetArrayFromImage(img)  # (..., Z, Y, X[, components])
        has_components = img.GetNumberOfComponentsPerPixel() > 1
        order = list(reversed(range(ndim))) + ([ndim] if has_components else [])
        array = np.ascontiguousarray(array.transpose(order))
        affine = _ras_affine(img)
        spatial = min(ndim, 3)
        meta: dict[str, Any] = {
            MetaKeys.AFFINE: affine,
            MetaKeys.ORIGINAL_AFFINE: affine.copy(),
            MetaKeys.SPATIAL_SHAPE: np.asarray(array.shape[:spatial]),
            MetaKeys.SPACE: SpaceKeys.RAS,
            MetaKeys.ORIGINAL_CHANNEL_DIM: -1 if array.ndim > spatial else float("nan"),
            "spacing": np.asarray(img.GetSpacing(), dtype=np.float64),
        }
        if img.HasMetaDataKey(_DICOM_MODALITY_TAG):
            meta["modality"] = img.GetMetaData(_DICOM_MODALITY_TAG)
        return array, meta


def is_scan_path(path: str | Path) -> bool:
    """True for a file in a supported scan format or a folder that holds DICOM files."""
    path = Path(path)
    if path.is_dir():
        return _has_dicom_files(path)
    return path.is_file() and _matching_suffix(path.name, NIFTI_SUFFIXES + SIMPLEITK_SUFFIXES) is not None


def list_scans(folder: str | Path) -> list[Path]:
    """Every scan under a folder, sorted: supported files, and each DICOM series folder counted once."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(folder, "is not a folder", "Pass a folder that holds scans, or the scan file itself")
    found: list[Path] = []
    for root, dirs, files in os.walk(folder):
        here = Path(root)
        if _has_dicom_files(here):
            found.append(here)
            dirs.clear()
            continue
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [here / f for f in files if not f.startswith(".") and is_scan_path(here / f)]
    return sorted(found)


def _reader_for(path: Path) -> ImageReader:
    if not path.exists():
        raise InputError(path, "does not exist", "Check the path and spelling, or pass an absolute path")
    if path.is_dir():
        if not _has_dicom_files(path):
            raise InputError(
                path,
                "is a folder with no DICOM files",
                f"Pass a scan file or a folder with one DICOM series: {SUPPORTED_FORMATS}",
            )
        return SimpleITKReader()
    if _matching_suffix(path.name, NIFTI_SUFFIXES):
        return NibabelReader()
    if _matching_suffix(path.name, SIMPLEITK_SUFFIXES):
        return SimpleITKReader()
    if path.name.lower().endswith(".dcm"):
        raise InputError(path, "is a single DICOM file", "Pass the folder that holds the whole DICOM series")
    extension = "".join(path.suffixes) or "(no extension)"
    raise InputError(path, f"has an unsupported file type {extension!r}", f"Convert it to one of: {SUPPORTED_FORMATS}")


@functools.lru_cache(maxsize=1)
def _loader() -> LoadImage:
    return LoadImage(image_only=True, dtype=np.float32, ensure_channel_first=False)


def _as_channel_first_3d(image: MetaTensor, path: Path) -> MetaTensor:
    """(X, Y, Z) or (X, Y, Z, 1...) → (1, X, Y, Z); 2D, single-slice and multi-volume images are refused."""
    data = image.as_tensor()
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    shape = tuple(image.shape)
    whole_scan = "Pass the 3D scan (the whole DICOM series or a 3D file)"
    if data.ndim == 2:
        raise InputError(path, f"is a 2D image of shape {shape}; a 3D volume is expected", whole_scan)
    if data.ndim == 4:
        raise InputError(
            path,
            f"is a 4D image of shape {shape} holding {shape[3]} volumes; one 3D volume is expected "
            "(a 4D file whose 4th axis has length 1 is accepted and squeezed)",
            "Save the one volume you want to segment to its own 3D file",
        )
    if data.ndim != 3:
        raise InputError(path, f"is a {data.ndim}D image of shape {shape}; a 3D volume is expected", whole_scan)
    if 1 in data.shape:
        raise InputError(path, f"is a single slice of shape {shape}; a 3D volume is expected", whole_scan)
    meta = dict(image.meta)
    meta[MetaKeys.ORIGINAL_CHANNEL_DIM] = "no_channel"
    return MetaTensor(data[None], meta=meta)


def _read_volume(path: Path) -> MetaTensor:
    reader = _reader_for(path)
    try:
        image = _loader()(path, reader=reader)
    except InputError:
        raise
    except Exception as err:  # any reader failure means the file cannot be used
        detail = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise InputError(
            path,
            f"is unreadable or truncated ({type(err).__name__}: {detail})",
            f"Check the file is complete and is one of: {SUPPORTED_FORMATS}",
        ) from err
    volume = _as_channel_first_3d(image, path)
    volume.meta[ImageMetaKey.FILENAME_OR_OBJ] = str(path)
    return volume


def _count_non_finite(data: torch.Tensor) -> tuple[int, int]:
    if bool(torch.isfinite(data).all()):  # the usual case, without counting (a count sums in int64: 8 bytes a voxel)
        return 0, 0
    n_nan = int(torch.isnan(data).sum())
    return n_nan, int((~torch.isfinite(data)).sum()) - n_nan


def load_scan(path: str | Path) -> MetaTensor:
    """Read a 3D scan as float32 (1, X, Y, Z) in its native orientation, with its RAS affine and file name."""
    path = Path(path)
    volume = _read_volume(path)
    n_nan, n_inf = _count_non_finite(volume.as_tensor())
    if n_nan or n_inf:
        raise InputError(
            path,
            f"contains {n_nan} NaN and {n_inf} infinite intensity values",
            "Replace those voxels with a valid intensity (e.g. the background value) and save the scan again",
        )
    return volume


def _describe(volume: MetaTensor) -> str:
    return str(volume.meta.get(ImageMetaKey.FILENAME_OR_OBJ, "the reference volume"))


def _format_affine(affine: Any) -> str:
    return np.array2string(np.asarray(affine, dtype=np.float64), precision=3, suppress_small=True).replace("\n", "")


def load_label(path: str | Path, like: MetaTensor) -> MetaTensor:
    """Read an integer label volume (1, X, Y, Z) as int64 and check it lies on the same voxel grid as `like`."""
    path = Path(path)
    label = _read_volume(path)
    fix = "Use the label file that belongs to this scan, or resample the label onto the scan's grid (nearest neighbour)"
    if tuple(label.shape[-3:]) != tuple(like.shape[-3:]):
        raise InputError(
            path,
            f"label shape {tuple(label.shape[-3:])} differs from scan {_describe(like)} shape {tuple(like.shape[-3:])}",
            fix,
        )
    if not np.allclose(np.asarray(label.affine), np.asarray(like.affine), atol=AFFINE_ATOL_MM):
        raise InputError(
            path,
            f"label affine {_format_affine(label.affine)} differs from scan {_describe(like)} "
            f"affine {_format_affine(like.affine)} (tolerance {AFFINE_ATOL_MM} mm)",
            fix,
        )
    values = label.as_tensor()
    class_ids = "A label map must hold class ids 0, 1, 2, ... (0 = background)"
    n_nan, n_inf = _count_non_finite(values)
    if n_nan or n_inf:
        raise InputError(path, f"contains {n_nan} NaN and {n_inf} infinite values", class_ids)
    rounded = values.round()
    if bool(((values - rounded).abs() > 1e-3).any()) or bool((rounded < 0).any()):
        raise InputError(path, "holds non-integer or negative values", class_ids)
    return MetaTensor(rounded.to(torch.int64), meta=dict(label.meta))


def to_ras(volume: MetaTensor) -> MetaTensor:
    """Reorient a channel-first volume to RAS axis order, keeping its affine consistent (the model works in RAS)."""
    return Orientation(axcodes="RAS", labels=None)(volume)


def _labels_on_grid(mask: Any, like: MetaTensor, path: Path) -> np.ndarray:
    """The mask as a non-negative integer (X, Y, Z) array in `like`'s voxel order."""
    grid_shape = tuple(like.shape[-3:])
    if isinstance(mask, MetaTensor):
        channel_first = mask if mask.ndim == 4 else MetaTensor(mask.as_tensor()[None], affine=mask.affine)
        axcodes = "".join(nib.orientations.aff2axcodes(np.asarray(like.affine)))
        oriented = Orientation(axcodes=axcodes, labels=None)(channel_first)
        if tuple(oriented.shape[-3:]) != grid_shape or not np.allclose(
            np.asarray(oriented.affine), np.asarray(like.affine), atol=AFFINE_ATOL_MM
        ):
            raise InputError(
                path,
                f"the mask (shape {tuple(mask.shape)}, affine {_format_affine(mask.affine)}) "
                "is not on the voxel grid of "
                f"{_describe(like)} (shape {grid_shape}, affine {_format_affine(like.affine)})",
                "Resample the mask onto the scan first (e.g. monai.transforms.ResampleToMatch, mode='nearest'), "
                "or pass a plain array in the scan's voxel order",
            )
        mask = oriented.as_tensor()
    array = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.shape != grid_shape:
        raise InputError(
            path,
            f"mask shape {array.shape} differs from {_describe(like)} shape {grid_shape}",
            "Pass a mask with one label per scan voxel",
        )
    if array.dtype == np.bool_:
        return array.astype(np.uint8)
    if not np.all(np.isfinite(array)) or np.any(array != np.round(array)) or np.any(array < 0):
        raise InputError(
            path,
            "mask holds non-integer, negative or non-finite values",
            "Threshold or argmax the prediction into class ids 0, 1, 2, ... first",
        )
    return array


def _refuse_overwrite(path: Path, like: MetaTensor, overwrite: bool) -> None:
    source = like.meta.get(ImageMetaKey.FILENAME_OR_OBJ)
    if source and Path(str(source)).resolve() == path.resolve():
        raise OutputExistsError(
            path, f"is the input scan {source}; refusing to overwrite it. Choose another output path"
        )
    if path.is_dir():
        raise InputError(path, "is a folder", "Give a file name ending in .nii.gz for the mask")
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise OutputExistsError(
            path, "already exists; pass overwrite=True (CLI: --overwrite) to replace it, or choose another path"
        )


def _write_nifti_atomically(data: np.ndarray, affine: np.ndarray, path: Path) -> None:
    suffix = _matching_suffix(path.name, NIFTI_SUFFIXES) or ".nii.gz"
    stem = path.name[: len(path.name) - len(suffix)]
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{stem}.tmp-{secrets.token_hex(4)}{suffix}")
    image = nib.Nifti1Image(data, affine)
    image.set_sform(affine, code="scanner")
    image.set_qform(affine, code="scanner")
    image.header.set_xyzt_units("mm")
    try:
        nib.save(image, temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def save_mask(mask: Any, like: MetaTensor | str | Path, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write an integer label map as NIfTI in `like`'s exact geometry (shape, affine, orientation), atomically.

    `mask` is an array/tensor in `like`'s voxel order ((X, Y, Z) or (1, X, Y, Z)), or a MetaTensor on the same
    grid in another orientation (e.g. the RAS volume the model saw), which is reoriented back first.
    """
    path = Path(path)
    if not _matching_suffix(path.name, NIFTI_SUFFIXES):
        raise InputError(path, "is not a NIfTI file name", "End the output name with .nii.gz (or .nii)")
    reference = like if isinstance(like, MetaTensor) else load_scan(like)
    _refuse_overwrite(path, reference, overwrite)
    labels = _labels_on_grid(mask, reference, path)
    dtype = np.min_scalar_type(int(labels.max()) if labels.size else 0)
    _write_nifti_atomically(labels.astype(dtype), np.asarray(reference.affine, dtype=np.float64), path)
    return path
