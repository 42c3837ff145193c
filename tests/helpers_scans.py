"""Test helpers shared by the `medclipsam segment` tests: scans written in NIfTI, NRRD and DICOM form (good and
unusable ones), a tiny model, the command run as a subprocess, and file trees compared before and after."""
from __future__ import annotations

import hashlib
import locale
import os
import signal
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
SERIES_UID = "1.2.826.0.1.3680043.2.1125.42"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def lps_flip(shape) -> np.ndarray:
    """Voxel map (i, j, k) -> (X-1-i, Y-1-j, k): the same scan stored left-posterior first."""
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = [shape[0] - 1, shape[1] - 1]
    return flip


def sitk_image(data: np.ndarray, ras_affine: np.ndarray) -> sitk.Image:
    """SimpleITK image of an (X, Y, Z) array with an axis-aligned RAS affine (ITK geometry is LPS)."""
    lps = LPS_TO_RAS @ ras_affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    image = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(2, 1, 0)))
    image.SetSpacing(spacing.tolist())
    image.SetOrigin(lps[:3, 3].tolist())
    image.SetDirection((lps[:3, :3] / spacing).flatten().tolist())
    return image


def write_dicom_series(folder: Path, image: sitk.Image, series_uid: str = SERIES_UID) -> None:
    """One CT DICOM file per axial slice with the geometry tags a scanner writes (a second series may be written into
    the same folder). GDCM's writer leaves the process in the "C" locale (ASCII text I/O for every later test), so
    the locale is restored afterwards."""
    saved = locale.setlocale(locale.LC_ALL)
    try:
        _write_dicom_slices(folder, image, series_uid)
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def _write_dicom_slices(folder: Path, image: sitk.Image, series_uid: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    direction = image.GetDirection()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetDepth()):
        plane = image[:, :, k]
        tags = {
            "0008|0060": "CT", "0008|0016": "1.2.840.10008.5.1.4.1.1.2", "0010|0020": "PHANTOM",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.41", "0020|000e": series_uid, "0020|0013": str(k + 1),
            "0020|0032": "\\".join(str(v) for v in image.TransformIndexToPhysicalPoint((0, 0, k))),
            "0020|0037": "\\".join(str(direction[i]) for i in (0, 3, 6, 1, 4, 7)),
            "0018|0050": str(image.GetSpacing()[2]), "0008|0018": f"{series_uid}.{k + 1}",
            "0020|0052": f"{series_uid}.0",  # Frame of Reference UID (a DICOM SEG shares it)
        }
        for tag, value in tags.items():
            plane.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{series_uid.rsplit('.', 1)[-1]}-{k:03d}.dcm"))
        writer.Execute(plane)


def tiny_model(folder: Path) -> Path:
    """A small untrained CLIP-Guided SAM (tiny ViT, MiniLM text) for the phantom card's organs, saved as `medclipsam
    train` saves a model."""
    from medclipsam.data.concepts import load_card
    from medclipsam.models.checkpoints import save_checkpoint
    from medclipsam.models.factory import build_method

    method = build_method("clip_guided_sam", load_card("phantom").names(), model_options={
        "sam": "tiny_vit", "adapter_blocks": "last1", "vision_language_kwargs": {"sam_channels": 32}})
    return save_checkpoint(method, folder, "clip_guided_sam", method.concepts, method.build_options(), method.frame)


def _default_signals() -> None:
    """In the child: Ctrl-C handled as in a terminal even when the test runner ignores it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_cli(*args: str, **popen) -> subprocess.Popen:
    """`medclipsam segment ARGS` as a subprocess (text I/O, offline, one thread)."""
    command = [sys.executable, "-m", "medclipsam.cli", "segment", *args]
    return subprocess.Popen(command, env=ENV, text=True, encoding="utf-8", preexec_fn=_default_signals, **popen)


def write_bad_scans(bad: Path, good: Path) -> None:
    """Scans a user may hand over that cannot be used: empty, truncated (from the `good` NIfTI file), not a scan, 2D,
    4D, NaN and infinite voxels, a one-slice DICOM series and a folder holding two DICOM series."""
    bad.mkdir()
    (bad / "empty.nii.gz").write_bytes(b"")
    (bad / "truncated.nii.gz").write_bytes(good.read_bytes()[:300])
    (bad / "text.nii.gz").write_text("patient notes, not a scan\n")
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    nib.save(nib.Nifti1Image(np.zeros((16, 16), np.int16), affine), bad / "flat.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 8, 2), np.int16), affine), bad / "series.nii.gz")
    for name, value in (("nan.nii.gz", np.nan), ("inf.nii.gz", np.inf)):
        volume = np.zeros((16, 16, 8), np.float32)
        volume[3, 4, 5] = value
        nib.save(nib.Nifti1Image(volume, affine), bad / name)
    slices = np.zeros((16, 16, 4), np.int16)
    write_dicom_series(bad / "one_slice", sitk_image(slices[:, :, :1], affine))
    write_dicom_series(bad / "two_series", sitk_image(slices, affine))
    write_dicom_series(bad / "two_series", sitk_image(slices + 5, affine), series_uid="1.2.826.0.1.3680043.2.1125.43")


def contents(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file (a link: where it points) under `folder`."""
    found = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        if path.is_symlink():
            found[key] = "-> " + os.readlink(path)
        elif path.is_file():
            found[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def listing(folder: Path) -> list[str]:
    """Every path under `folder`, relative and sorted (hidden ones included)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))
