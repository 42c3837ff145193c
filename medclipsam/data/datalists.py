"""Decathlon-style datalists (MSD dataset.json) with checked paths and case ids, and seeded splits by case."""
from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Sequence

from monai.data import load_decathlon_datalist

from medclipsam.errors import InputError

_PATH_KEYS = ("image", "label")
_STRIPPED_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


def case_id_from_path(path: str | Path) -> str:
    """The case id of a scan: its file name without .nii/.nii.gz (or NRRD/MetaImage suffix), or its folder name."""
    name = Path(path).name
    lowered = name.lower()
    suffix = next((s for s in _STRIPPED_SUFFIXES if lowered.endswith(s)), "")
    return name[: len(name) - len(suffix)] if suffix else name


def _read_json(path: Path, key: str) -> list:
    """The list under `key` in a datalist JSON, with a project error for each way the file can be unusable."""
    if not path.is_file():
        raise InputError(path, "datalist file does not exist", "Check the path to the dataset.json / datalist JSON")
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(path, f"datalist is not valid JSON ({err})", "Fix the JSON syntax of the file") from None
    if not isinstance(content, dict) or key not in content:
        keys = ", ".join(repr(k) for k in content) if isinstance(content, dict) else "none"
        raise InputError(path, f"datalist has no key {key!r} (keys: {keys})",
                         f"Pass one of the keys that holds a list of cases, or add {key!r} to the JSON")
    entries = content[key]
    if not isinstance(entries, list) or not entries:
        raise InputError(path, f"datalist key {key!r} does not hold a non-empty list of cases",
                         'Write it as a list of {"image": ..., "label": ...} entries')
    for index, entry in enumerate(entries):
        if not (isinstance(entry, str) or (isinstance(entry, dict) and isinstance(entry.get("image"), (str, list)))):
            raise InputError(path, f"entry {index} of {key!r} has no 'image' path",
                             'Give every entry an "image" path (and a "label" path for training data)')
    return entries


def load_datalist(path: str | Path, key: str = "training") -> list[dict]:
    """Read the cases under `key` of a decathlon-style JSON, paths made absolute from the JSON's folder and checked
    to exist; each item gets a `case_id` (image file name without its suffix)."""
    path = Path(path).resolve()
    _read_json(path, key)
    items = load_decathlon_datalist(path, is_segmentation=True, data_list_key=key, base_dir=path.parent)
    seen: dict[str, str] = {}
    for item in items:
        for field in _PATH_KEYS:
            files = item.get(field)
            for file in [files] if isinstance(files, str) else files or []:
                if not Path(file).exists():
                    raise InputError(path, f"{field} file {file} listed under {key!r} does not exist",
                                     "Fix the path in the datalist (relative paths start at the JSON's folder) "
                                     "or remove the entry")
        image = item["image"] if isinstance(item["image"], str) else item["image"][0]
        case_id = case_id_from_path(image)
        if case_id in seen:
            raise InputError(path, f"case id {case_id!r} appears twice ({seen[case_id]} and {image})",
                             "Give every case a distinct image file name")
        seen[case_id] = image
        item["case_id"] = case_id
    return items


def _shuffled_by_case(items: Sequence[dict], seed: int) -> list[dict]:
    """Items sorted by case id then shuffled with `seed`, so the order depends only on the cases and the seed."""
    ordered = sorted(items, key=lambda item: str(item["case_id"]))
    random.Random(seed).shuffle(ordered)
    return ordered


def _by_case_id(items: list[dict]) -> list[dict]:
    return sorted(items, key=lambda item: str(item["case_id"]))


def split_cases(items: Sequence[dict], labelled: int | float, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Split cases into (labelled, unlabelled) for semi-supervised training: `labelled` is a count (int) or a
    fraction in (0, 1] (float, rounded half up); at least one case is labelled. Deterministic per seed, whatever the input order."""
    n_cases = len(items)
    if n_cases == 0:
        raise ValueError("split_cases: no cases to split")
    if isinstance(labelled, bool) or not isinstance(labelled, (int, float)):
        raise ValueError(f"split_cases: labelled must be an int count or a float fraction, got {labelled!r}")
    if isinstance(labelled, float):
        if not 0.0 < labelled <= 1.0:
            raise ValueError(f"split_cases: a labelled fraction must lie in (0, 1], got {labelled}")
        n_labelled = max(1, math.floor(labelled * n_cases + 0.5))  # half rounds up
    else:
        if not 1 <= labelled <= n_cases:
            raise ValueError(f"split_cases: labelled count must be between 1 and {n_cases} cases, got {labelled}")
        n_labelled = labelled
    shuffled = _shuffled_by_case(items, seed)
    return _by_case_id(shuffled[:n_labelled]), _by_case_id(shuffled[n_labelled:])


def train_val_split(items: Sequence[dict], n_val: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Split cases into (train, validation) with `n_val` validation cases, keeping at least one for training.
    Deterministic per seed, whatever the input order."""
    if isinstance(n_val, bool) or not isinstance(n_val, int) or not 0 <= n_val < len(items):
        raise ValueError(f"train_val_split: n_val must be an int in [0, {len(items) - 1}] for {len(items)} cases, "
                         f"got {n_val!r}")
    shuffled = _shuffled_by_case(items, seed)
    return _by_case_id(shuffled[n_val:]), _by_case_id(shuffled[:n_val])
