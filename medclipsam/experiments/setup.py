"""Experiment setup shared by the notebooks and the benchmark scripts: the scale preset, the device and the cases
(a real MSD-style dataset, or CT phantoms written on the fly)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

from medclipsam.data.datalists import load_datalist, split_cases, train_val_split
from medclipsam.data.phantom import DEFAULT_SHAPE, write_phantom_dataset
from medclipsam.errors import InputError

SCALES = ("tiny", "phantom", "full")
SCALE_VARIABLE = "MEDCLIPSAM_NOTEBOOK_SCALE"


def notebook_scale(default: str = "phantom") -> str:
    """The scale a notebook runs at: environment variable MEDCLIPSAM_NOTEBOOK_SCALE, else `default`."""
    scale = os.environ.get(SCALE_VARIABLE, default).strip().lower()
    if scale not in SCALES:
        raise InputError(None, f"{SCALE_VARIABLE}={scale!r} is not a notebook scale",
                         f"Set it to one of {', '.join(SCALES)} (or unset it for {default!r})")
    return scale


def experiment_cases(data_dir: str | Path | None, n_training: int | None, n_held_out: int, folder: str | Path,
                     seed: int = 0, shape: Sequence[int] = DEFAULT_SHAPE) -> tuple[list[dict], list[dict]]:
    """(training, held-out) datalist entries.

    `data_dir` None: `n_training` + `n_held_out` CT phantoms (seeds from `seed`) written into `folder`. Otherwise a
    folder holding `dataset.json` (or that file): its "validation" cases are held out (the first `n_held_out`), or,
    without that key, `n_held_out` training cases are; `n_training` keeps that many training cases (None: all),
    chosen by `seed`.
    """
    if data_dir is None:
        if n_training is None:
            raise InputError(None, "n_training is None but no data_dir was given",
                             "Say how many training phantoms to write, or point data_dir at a dataset")
        path = write_phantom_dataset(folder, n_training, seed=seed, shape=tuple(shape), n_validation=n_held_out)
        return load_datalist(path, "training"), load_datalist(path, "validation") if n_held_out else []
    path = Path(data_dir)
    path = path / "dataset.json" if path.is_dir() else path
    training = load_datalist(path, "training")
    if json.loads(path.read_text(encoding="utf-8")).get("validation"):
        held_out = load_datalist(path, "validation")[:n_held_out]
    else:
        training, held_out = train_val_split(training, n_held_out, seed=seed)
    if n_training is not None and n_training < len(training):
        training = split_cases(training, n_training, seed=seed)[0]
    return training, held_out
