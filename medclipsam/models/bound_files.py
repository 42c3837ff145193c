"""Files fitted for one model's weights and stored beside them (the slice gate, the organ offsets): written with the
weights' SHA-256 and refused when read beside other weights, so a refit model never uses another model's fit."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

from medclipsam.atomic import atomic_write
from medclipsam.errors import WeightsError
from medclipsam.models.checkpoints import WEIGHTS_FILE


def weights_fingerprint(folder: str | Path) -> str:
    """SHA-256 of a checkpoint's weights file: which weights a file beside them was fitted for."""
    return hashlib.sha256((Path(folder) / WEIGHTS_FILE).read_bytes()).hexdigest()


def write_bound(folder: str | Path, name: str, data: Mapping[str, Any]) -> Path:
    """Write `data` as JSON file `name` in checkpoint `folder` (atomically), bound to the weights there."""
    path = Path(folder) / name
    text = json.dumps({**data, "weights_sha256": weights_fingerprint(folder)}, indent=1) + "\n"
    atomic_write(path, lambda temp: Path(temp).write_text(text, encoding="utf-8"))
    return path


def read_bound(folder: str | Path, name: str, file_format: str, fix: str) -> dict[str, Any] | None:
    """JSON file `name` of checkpoint `folder` (None when absent); WeightsError, with `fix`, when it is unreadable,
    not of `file_format`, or was fitted for other weights."""
    path = Path(folder) / name
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise WeightsError(path, f"cannot be read ({error})", fix) from None
    if not isinstance(raw, dict) or raw.get("format") != file_format:
        raise WeightsError(path, f"is not a {file_format} file", fix)
    if raw.get("weights_sha256") != weights_fingerprint(folder):
        raise WeightsError(path, f"was fitted for other weights than {WEIGHTS_FILE} in this folder", fix)
    return raw
