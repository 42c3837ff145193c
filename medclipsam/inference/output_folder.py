"""The output folder of `medclipsam segment`: checked and locked before any work, one sub-folder per scan built under a
hidden temporary name and renamed into place in one step, leftovers of killed runs removed.

OUT holds only what the command documents: OUT/<scan>/ (labels.nii.gz, report.json, report.csv, preview.png),
OUT/summary.json and, while a run writes there, the lock file OUT/.medclipsam-segment.lock naming its process. The
lock is an advisory lock (flock) the system drops when its process ends, even when killed, so a stale lock file is
simply taken over. Kept free of heavy imports so that a bad or busy --out is reported at once.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

from medclipsam.atomic import share_as_umask
from medclipsam.errors import InputError, OutputExistsError

MASK_FILE, REPORT_JSON, REPORT_CSV, PREVIEW_FILE, SUMMARY_FILE = (
    "labels.nii.gz", "report.json", "report.csv", "preview.png", "summary.json")
LOCK_FILE = ".medclipsam-segment.lock"
_PARTIAL, _REPLACED = ".partial-", ".replaced-"
_LEFTOVER_FILES = f".{SUMMARY_FILE}.*.tmp"  # atomic_write's temporary files


def prepare_output(out: str | Path, inputs: Sequence[str | Path]) -> Path:
    """Create `out` (and its parents) after checking it is not a file and neither is nor lies inside an input
    folder (results would be mixed with the scans and read back as inputs)."""
    out = Path(out)
    fix = "Give a folder path for the results (it is created if missing)"
    if out.is_symlink() and not out.exists():
        raise InputError(out, "--out is a broken symbolic link", f"Remove the link or choose another --out. {fix}")
    if out.exists() and not out.is_dir():
        raise InputError(out, "--out is an existing file, not a folder", fix)
    resolved = out.resolve()
    for given in inputs:
        folder = Path(given).resolve()
        if Path(given).is_dir() and (resolved == folder or folder in resolved.parents):
            where = "is the input folder" if resolved == folder else "lies inside the input folder"
            raise InputError(out, f"--out {where} {given}, so results would be mixed with the scans",
                             "Choose a --out outside every input folder, e.g. next to it")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(out, f"--out cannot be created ({error.strerror})",
                         "Choose a folder you can write to, or create it first") from None
    return out


class OutputLock:
    """Exclusive use of an output folder by this run; `release` ends it (and deletes the lock file)."""

    def __init__(self, folder: Path, descriptor: int | None) -> None:
        self.folder = folder
        self._descriptor = descriptor

    def release(self) -> None:
        """Delete the lock file and drop the lock (in this order, so no other run can hold a deleted file)."""
        if self._descriptor is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.folder / LOCK_FILE)
        os.close(self._descriptor)
        self._descriptor = None


def _holder(descriptor: int) -> str:
    """Who holds a lock, from its file: 'pid 12, host x, started 2025-01-31 09:00:00'."""
    try:
        os.lseek(descriptor, 0, os.SEEK_SET)
        info = json.loads(os.read(descriptor, 4096).decode("utf-8"))
        return f"pid {info['pid']} on host {info['host']}, started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "its process did not say which it is"


def _open_lock_file(folder: Path) -> int:
    path = folder / LOCK_FILE
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise InputError(path, "is a symbolic link, not medclipsam's lock file",
                             "Remove it; medclipsam writes no links into --out") from None
        raise InputError(folder, f"--out is not writable ({error.strerror})",
                         "Choose a folder you can write to") from None


def lock_output(folder: Path) -> OutputLock:
    """Take `folder` for this run, or raise an error naming the run that has it (pid, host, start time). Where the
    file system cannot lock, warn and go on unlocked."""
    path = folder / LOCK_FILE
    while True:
        descriptor = _open_lock_file(folder)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(descriptor)
            os.close(descriptor)
            raise InputError(folder, f"--out is in use by another medclipsam segment run ({holder})",
                             "Wait for it to finish, or choose another --out") from None
        except OSError as error:
            os.close(descriptor)
            print(f"medclipsam: warning: cannot lock {folder} ({error.strerror}); do not run two segment commands "
                  "into it at once", file=sys.stderr)
            return OutputLock(folder, None)
        with contextlib.suppress(OSError):
            if os.path.samestat(os.fstat(descriptor), os.stat(path)):
                break  # else the previous holder deleted the file after we opened it: lock the new one
        os.close(descriptor)
    started = datetime.datetime.now().astimezone().isoformat(sep=" ", timespec="seconds")
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": started, "command": "medclipsam segment"}
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, (json.dumps(info) + "\n").encode("utf-8"), 0)
    return OutputLock(folder, descriptor)


def remove_leftovers(out: Path) -> None:
    """Delete temporary scan folders and summary files left in `out` by killed runs (under the lock, every
    temporary entry is a leftover)."""
    for entry in out.iterdir():
        prefix = next((p for p in (_PARTIAL, _REPLACED) if entry.name.startswith(p)), None)
        pid = entry.name[len(prefix):].split("-", 1)[0] if prefix else ""
        if pid.isdigit() and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
    for entry in out.glob(_LEFTOVER_FILES):
        if entry.is_file():
            entry.unlink(missing_ok=True)


def already_done(final: Path, settings: dict[str, Any], overwrite: bool) -> bool:
    """True if `final` holds this scan's result made with `settings` (skip it); False if there is nothing or
    --overwrite replaces it; an error if it holds anything else (a link or file is never written through)."""
    fix = "pass --overwrite to redo it, or choose another --out"
    if final.is_symlink() or (final.exists() and not final.is_dir()):
        if overwrite:
            return False
        what = f"a symbolic link (to {os.readlink(final)})" if final.is_symlink() else "a file"
        raise OutputExistsError(final, f"is {what}, not a result folder of this command; pass --overwrite to "
                                "replace it (a link's target is left alone), or choose another --out")
    if not final.exists() or overwrite:
        return False
    try:
        previous = json.loads((final / REPORT_JSON).read_text(encoding="utf-8"))["settings"]
    except (OSError, ValueError, KeyError, TypeError):
        raise OutputExistsError(final, f"exists but holds no readable {REPORT_JSON}, so it is no result of this "
                                "command; --overwrite would replace it and what it holds, or choose another --out") \
            from None
    if previous == settings:
        return True
    changed = sorted(key for key in settings.keys() | previous.keys() if settings.get(key) != previous.get(key))
    raise OutputExistsError(final, f"holds a result made with other settings ({', '.join(changed)} differ); {fix}")


@contextlib.contextmanager
def staging(out: Path) -> Iterator[Path]:
    """A hidden temporary folder in `out`, deleted unless the body published it."""
    folder = Path(tempfile.mkdtemp(prefix=f"{_PARTIAL}{os.getpid()}-", dir=out))
    try:
        yield folder
    finally:
        if folder.exists():
            shutil.rmtree(folder, ignore_errors=True)


def publish(staged: Path, final: Path) -> None:
    """Rename a finished scan folder into place in one step; whatever was at `final` (an older result, a link, a
    file) is moved aside first, then deleted (a link, not its target)."""
    share_as_umask([staged, *staged.iterdir()])
    old = None
    if os.path.lexists(final):
        old = Path(tempfile.mkdtemp(prefix=f"{_REPLACED}{os.getpid()}-", dir=final.parent))
        os.replace(final, old / final.name)
    os.replace(staged, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
