"""Phantom datasets on disk: MSD-layout NIfTI cases with dataset.json and the `phantom` card, classic or scanner."""
from __future__ import annotations

import json
from pathlib import Path

from medclipsam.data.concepts import card_text, load_card
from medclipsam.errors import InputError, OutputExistsError

from .classic import DEFAULT_SHAPE, DEFAULT_SPACING, PHANTOM_CARD, make_phantom
from .files import write_text
from .scanner import make_scanner_phantom


def write_phantom_dataset(root: str | Path, n: int, seed: int = 0, shape: tuple[int, int, int] = DEFAULT_SHAPE,
                          spacing: tuple[float, float, float] = DEFAULT_SPACING, overwrite: bool = False,
                          n_validation: int = 0, scanner: bool = False) -> Path:
    """Write `n` phantoms (case i from seed + i) as an MSD-layout dataset with dataset.json and card.yaml, plus
    `n_validation` held-out labelled cases (seeds after the training ones) under "validation".

    `scanner=True` writes scanner phantoms (each case's geometry drawn from its seed, listed in geometry.json)
    instead of classic ones on the `shape`/`spacing` grid. Returns the path of dataset.json.
    """
    if n < 1:
        raise InputError(root, f"asked for {n} phantom cases", "Ask for at least one case (n >= 1)")
    if scanner and (tuple(shape) != DEFAULT_SHAPE or tuple(spacing) != DEFAULT_SPACING):
        raise InputError(root, "scanner phantoms take their grid from each case's drawn scanner geometry, not from "
                         "shape/spacing", "Drop shape and spacing, or pass scanner=False for classic phantoms")
    root = Path(root)
    datalist_path = root / "dataset.json"
    if datalist_path.exists() and not overwrite:
        raise OutputExistsError(datalist_path, "a dataset already exists here; pass overwrite=True to replace it")
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    card = load_card(PHANTOM_CARD)
    training, validation, geometries = [], [], {}
    for i in range(n + n_validation):
        name = f"phantom_{i:03d}.nii.gz"
        phantom = make_scanner_phantom(seed + i) if scanner else make_phantom(seed + i, shape, spacing)
        phantom.to_nifti(root / "imagesTr" / name, root / "labelsTr" / name, overwrite)
        (training if i < n else validation).append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
        if phantom.geometry is not None:
            geometries[f"./imagesTr/{name}"] = {"seed": seed + i, **phantom.geometry.to_dict()}
    kind = ", scanner geometries drawn per seed (geometry.json)" if scanner else ""
    datalist = {
        "name": card.name,
        "description": f"{card.title}: {n} training + {n_validation} validation cases, seeds "
                       f"{seed}..{seed + n + n_validation - 1}{kind}",
        "licence": card.licence,
        "tensorImageSize": "3D",
        "modality": {"0": card.modality},
        "labels": {"0": "background", **{str(i): name for i, name in card.label_map().items()}},
        "numTraining": n,
        "numTest": 0,
        "training": training,
        "validation": validation,
        "test": [],
    }
    write_text(root / "card.yaml", card_text(PHANTOM_CARD), overwrite)
    if scanner:
        write_text(root / "geometry.json", json.dumps(geometries, indent=2) + "\n", overwrite)
    write_text(datalist_path, json.dumps(datalist, indent=2) + "\n", overwrite=True)
    return datalist_path
