"""Atomic file writes: a temp file beside the target renamed into place, so a reader never sees half a file, with
the permissions a plain write would have given (temp files are created private)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Sequence


def share_as_umask(paths: Sequence[Path]) -> None:
    """Give files and folders made by mkstemp/mkdtemp (private) the permissions the user's umask gives new ones."""
    umask = os.umask(0)
    os.umask(umask)
    for path in paths:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Call `write(temp_path)` on a temp file beside `path`, then rename it into place (no half-written files)."""
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        write(temp)
        share_as_umask([Path(temp)])
        os.replace(temp, path)
    finally:
        if os.path.exists(temp):
            os.unlink(temp)
