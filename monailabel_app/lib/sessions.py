"""One predictor per image, kept between requests: a refinement of an image segmented before reuses its slice
encodings (the frozen trunk) and its last result. Images are told apart by content, so an image uploaded again
(MONAI Label saves each upload under a new temporary name) still finds its predictor."""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from monai.data import MetaTensor

from medclipsam.inference.predictor import Predictor, Segmentation

_CHUNK = 1 << 22


def image_key(path: str | Path) -> str:
    """A digest of a file's bytes, or of a DICOM folder's file names, sizes and modification times."""
    path = Path(path)
    digest = hashlib.sha256()
    if path.is_dir():
        for entry in sorted(path.iterdir()):
            stat = entry.stat()
            digest.update(f"{entry.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        return f"{path.resolve()}:{digest.hexdigest()}"
    with open(path, "rb") as stream:
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class Session:
    """An image's predictor (its scan set) and the last segmentation the client got for it."""

    predictor: Predictor
    result: Segmentation | None = None


class Sessions:
    """The sessions of the most recently used images, at most `size` (each holds an image's slice encodings)."""

    def __init__(self, make_predictor: Callable[[], Predictor], size: int = 2) -> None:
        if size < 1:
            raise ValueError(f"cached_images {size} must be at least 1")
        self.make_predictor, self.size = make_predictor, size
        self.lock = threading.Lock()  # one request at a time runs the model and edits a session
        self._open: OrderedDict[str, Session] = OrderedDict()

    def open(self, key: str, scan: MetaTensor) -> tuple[Session, bool]:
        """The session of image `key` and True, or a new one on `scan` and False (the least recent is dropped)."""
        if key in self._open:
            self._open.move_to_end(key)
            return self._open[key], True
        predictor = self.make_predictor()
        predictor.set_volume(scan)
        self._open[key] = Session(predictor)
        while len(self._open) > self.size:
            self._open.popitem(last=False)
        return self._open[key], False
