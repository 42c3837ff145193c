"""Atomic file writes for phantoms: NIfTI volumes with a scanner-coordinate affine, and text files."""
from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np

from medclipsam.errors import OutputExistsError


def save_nifti(data: np.ndarray, affine: np.ndarray, path: Path, overwrite: bool) -> None:
    """Write a NIfTI file with a scanner-coordinate affine via a temporary file and an atomic rename."""
    if path.exists() and not overwrite:
        raise OutputExistsError(path, "file exists; pass overwrite=True to replace it")
    image = nib.Nifti1Image(data, affine)
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    image.header.set_xyzt_units("mm")
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    _atomic(path, suffix, lambda tmp: nib.save(image, tmp))


def write_text(path: Path, text: str, overwrite: bool) -> None:
    """Write a UTF-8 text file atomically, refusing to replace one unless `overwrite`."""
    if path.exists() and not overwrite:
        raise OutputExistsError(path, "file exists; pass overwrite=True to replace it")
    _atomic(path, path.suffix, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _atomic(path: Path, suffix: str, write: Callable[[str], None]) -> None:
    """Run `write` on a temporary file next to `path` (keeping its suffix, which picks the format), then move it
    into place in one step."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = str(path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp{suffix}"))
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
