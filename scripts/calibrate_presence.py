"""Calibrate the presence model (`medclipsam.inference.presence`) for a segmentation model, offline, in one command.

Builds the calibration set, runs the model through the predictor on every case (all nine organs of the phantom card
asked each time), measures each organ's evidence with the package's own code, fits a logistic regression, measures
its separation on held-out sources (leave one source out: every case of a source is predicted by a fit that never
saw that source) and writes the coefficients, threshold and figures as JSON.

Cases (each a few slices about 3 mm apart, the spacing models resample to, to keep the CPU cost down):
  abdomen       the real labelled CT of data/real_ct_abdomen (slabs with and without each organ, a small field of
                view, a 4-slice crop); held-out scanner-like phantoms (seeds from 1000: the default model trains on
                0-5) and classic phantoms; an organ counts as found when at least 30% of its mask lies on it
  blank         constant volumes; a water cylinder in air with CT noise
  noise         white Gaussian and uniform noise, a smooth random field with tissue-like values
  other region  a head CT (Debian invesalius-examples) and brain MRs (MNI152 from nilearn, Colin27 from Debian
                mricron-data), asked for abdominal organs

Usage: python scripts/calibrate_presence.py [--model default] [--out medclipsam/assets/presence_calibration.json]
                                            [--cache runs/presence_calibration] [--threads 2]
Needs: apt-get install invesalius-examples mricron-data; pip install nilearn.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import io
import json
import math
import plistlib
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from scipy import ndimage
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from medclipsam.atomic import atomic_write
from medclipsam.data.concepts import load_card
from medclipsam.data.phantom import make_phantom, make_scanner_phantom, scanner_geometry
from medclipsam.inference.predictor import Predictor, Segmentation
from medclipsam.inference.presence import CALIBRATION_FORMAT, calibration_path, measure, model_fingerprint
from medclipsam.inference.presence_features import FEATURES
from medclipsam.models import factory

ROOT = Path(__file__).resolve().parents[1]
REAL_CT = ROOT / "data" / "real_ct_abdomen"
HEAD_CT = Path("/usr/share/doc/invesalius-examples/examples/Cranium.inv3")
COLIN27 = Path("/usr/share/mricron/templates/ch2.nii.gz")
CARD = "phantom"
MIN_PRECISION = 0.3  # share of a mask on the true organ for it to count as found
KEEP_FOUND = 0.95  # share of found organs the threshold keeps present on held-out sources
PHANTOM_SEEDS = (1000, 1001, 1002)
CLASSIC_SEEDS = (1000, 1001)


@dataclass
class Case:
    """One calibration volume: (X, Y, Z) array and its affine, the source it is held out with, its kind, and the
    true organ masks (None where no abdominal organ can be present)."""

    name: str
    source: str
    kind: str
    volume: np.ndarray
    affine: np.ndarray
    truth: dict[str, np.ndarray] | None = None


def resample_index(affine: np.ndarray, start: tuple[int, int, int], step: tuple[int, int, int]) -> np.ndarray:
    """Affine of the sub-grid volume[start::step] (honest spacing and origin)."""
    index = np.diag([*map(float, step), 1.0])
    index[:3, 3] = start
    return np.asarray(affine, dtype=np.float64) @ index


def sub_grid(volume: np.ndarray, affine: np.ndarray, z: slice, xy: tuple[slice, slice] = (slice(None),) * 2
             ) -> tuple[np.ndarray, np.ndarray]:
    """volume[x, y, z] with its affine; slices may step."""
    xs, ys = (s.indices(n) for s, n in zip(xy, volume.shape[:2]))
    zs = z.indices(volume.shape[2])
    part = volume[xs[0]:xs[1]:xs[2], ys[0]:ys[1]:ys[2], zs[0]:zs[1]:zs[2]]
    return part, resample_index(affine, (xs[0], ys[0], zs[0]), (xs[2], ys[2], zs[2]))


def read_head_ct(path: Path = HEAD_CT) -> tuple[np.ndarray, np.ndarray]:
    """InVesalius project (a tar.gz): matrix.dat, int16 (slices, rows, columns) with its spacing in main.plist, as
    an (X, Y, Z) HU array and affine. Rows run posterior to anterior and slices inferior to superior (checked on the
    images: face at high rows and low slices); the file does not record left-right, taken as radiological (columns
    towards the patient's left), which no test depends on."""
    with tarfile.open(path) as archive:
        members = {Path(m.name).name: m for m in archive.getmembers()}
        header = plistlib.load(io.BytesIO(archive.extractfile(members["main.plist"]).read()))
        raw = archive.extractfile(members[header["matrix"]["filename"]]).read()
    shape = tuple(header["matrix"]["shape"])
    data = np.frombuffer(raw, dtype=np.dtype(header["matrix"]["dtype"]).newbyteorder("<")).reshape(shape)
    column_mm, row_mm, slice_mm = (float(s) for s in header["spacing"])
    volume = np.ascontiguousarray(data.transpose(2, 1, 0)).astype(np.float32)
    return volume, np.diag([-column_mm, row_mm, slice_mm, 1.0])


def blank_volume(hu: float, shape: tuple[int, int, int] = (128, 128, 4),
                 spacing: tuple[float, float, float] = (3.0, 3.0, 3.0)) -> tuple[np.ndarray, np.ndarray]:
    """A constant volume (no anatomy) with a plain RAS affine."""
    return np.full(shape, hu, dtype=np.float32), np.diag([*spacing, 1.0])


def real_ct_cases() -> Iterator[Case]:
    """Six-slice slabs (18 mm) of the labelled real CT from the renal veins to the dome (organs in and out of
    them), two pelvis slabs (none of the nine), a small field of view inside the body, and the 4-slice crop through
    the spleen the tests use."""
    image = nib.load(REAL_CT / "ct.nii.gz")
    volume = np.asarray(image.dataobj, dtype=np.float32)
    labels = np.asarray(nib.load(REAL_CT / "labels.nii.gz").dataobj)
    ids = load_card("totalsegmentator").id_map_from(load_card(CARD))
    names = load_card(CARD).label_map()
    whole = (slice(None), slice(None))
    slabs = [(f"slices {z}-{z + 5}", slice(z, z + 6), whole) for z in (58, 76, 88, 100, 106, 20, 40)]
    slabs += [("spleen crop", slice(95, 99), whole),
              ("small field of view", slice(88, 94), (slice(20, 100), slice(15, 85)))]
    for name, z, xy in slabs:
        part, affine = sub_grid(volume, image.affine, z, xy)
        truth_labels, _ = sub_grid(labels, image.affine, z, xy)
        truth = {names[i]: truth_labels == ids[i] for i in names}
        yield Case(f"real CT {name}", "real CT", "abdomen", part, affine, truth)


def phantom_cases() -> Iterator[Case]:
    """Held-out scanner-like phantoms (their drawn scanner, 5 mm slices, two 30 mm slabs at seeded heights between
    the kidneys' lower poles and the dome), a pelvis slab below every organ, and classic phantoms (4 slices)."""
    names = load_card(CARD).label_map()
    for seed in PHANTOM_SEEDS:
        drawn = scanner_geometry(seed)
        noise = drawn.noise_hu * math.sqrt(drawn.slice_mm / 5.0)
        for k, height in enumerate(np.random.default_rng(seed).uniform(-70.0, 100.0, 2)):
            geometry = dataclasses.replace(drawn, slice_mm=5.0, slices=6, z_centre_mm=float(height), noise_hu=noise)
            phantom = make_scanner_phantom(seed, geometry)
            truth = {organ: phantom.label == i for i, organ in names.items()}
            yield Case(f"phantom {seed} slab {k}", f"phantom {seed}", "abdomen", phantom.image, phantom.affine, truth)
    pelvis = make_scanner_phantom(PHANTOM_SEEDS[0], dataclasses.replace(
        scanner_geometry(PHANTOM_SEEDS[0]), slice_mm=5.0, slices=6, z_centre_mm=-170.0, noise_hu=10.0))
    yield Case("phantom pelvis", f"phantom {PHANTOM_SEEDS[0]}", "abdomen", pelvis.image, pelvis.affine,
               {organ: pelvis.label == i for i, organ in names.items()})
    for seed in CLASSIC_SEEDS:
        phantom = make_phantom(seed)
        part, affine = sub_grid(phantom.image, phantom.affine, slice(14, 18))
        label, _ = sub_grid(phantom.label, phantom.affine, slice(14, 18))
        yield Case(f"classic phantom {seed}", f"classic {seed}", "abdomen", part, affine,
                   {organ: label == i for i, organ in names.items()})


def blank_and_noise_cases() -> Iterator[Case]:
    """Constant volumes, a water cylinder in air, white and uniform noise, and a smooth random field (4 slices)."""
    for hu in (-1000.0, 0.0, 40.0, 100.0):
        yield Case(f"blank {hu:g} HU", "blank", "blank", *blank_volume(hu))
    yield Case("blank 40 HU, 512 matrix", "blank", "blank", *blank_volume(40.0, (512, 512, 4), (0.8, 0.8, 3.0)))
    rng = np.random.default_rng(0)
    x, y = np.meshgrid(np.arange(256) - 127.5, np.arange(256) - 127.5, indexing="ij")
    cylinder = np.where((np.hypot(x, y) < 110)[..., None], rng.normal(0.0, 10.0, (256, 256, 4)), -1000.0)
    yield Case("water cylinder", "water cylinder", "blank", cylinder.astype(np.float32), np.diag([1.0, 1.0, 3.0, 1.0]))
    shape, affine = (128, 128, 4), np.diag([3.0, 3.0, 3.0, 1.0])
    yield Case("white noise", "noise", "noise", rng.normal(0.0, 300.0, shape).astype(np.float32), affine)
    yield Case("uniform noise", "noise", "noise", rng.uniform(-1000.0, 1000.0, shape).astype(np.float32), affine)
    field = ndimage.gaussian_filter(rng.normal(0.0, 1.0, shape), (4.0, 4.0, 1.0))
    field = 40.0 + 60.0 * field / field.std() + rng.normal(0.0, 10.0, shape)
    yield Case("smooth random field", "noise", "noise", field.astype(np.float32), affine)


def head_ct_slab(first: int, slices: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """`slices` slices of the head CT every 3 mm (every second one) from slice `first`."""
    head, affine = read_head_ct()
    return sub_grid(head, affine, slice(first, first + 2 * slices, 2))


def colin27_slab(first: int, slices: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """`slices` slices of the Colin27 T1 brain MR every 3 mm from slice `first` (values as stored: 0-255)."""
    colin = nib.load(COLIN27)
    return sub_grid(np.asarray(colin.dataobj, dtype=np.float32), colin.affine, slice(first, first + 3 * slices, 3))


def other_region_cases() -> Iterator[Case]:
    """A head CT and brain MRs (as read: MR values are no HU), six slices 3 mm apart each."""
    for name, first in (("skull base", 20), ("vertex", 70)):
        yield Case(f"head CT {name}", "head CT", "other region", *head_ct_slab(first))
    from nilearn.datasets import load_mni152_template

    mni = load_mni152_template(resolution=1)
    mni_volume = np.asarray(mni.get_fdata(), dtype=np.float32)
    yield Case("MNI152 T1", "MNI152", "other region", *sub_grid(mni_volume, mni.affine, slice(60, 78, 3)))
    yield Case("MNI152 T1 x1000", "MNI152", "other region",
               *sub_grid(mni_volume * 1000.0, mni.affine, slice(100, 118, 3)))
    yield Case("Colin27 T1", "Colin27", "other region", *colin27_slab(80))


def all_cases() -> Iterator[Case]:
    """The whole calibration set, in a fixed order."""
    yield from real_ct_cases()
    yield from phantom_cases()
    yield from blank_and_noise_cases()
    yield from other_region_cases()


def model_identity(source: str) -> dict:
    """What the calibration is for: the model's source, its checkpoint folder's fingerprint, method and step."""
    folder = factory.default_model_path() if source == factory.DEFAULT_MODEL else Path(source)
    saved = json.loads((folder / "method.json").read_text()) if (folder / "method.json").is_file() else {}
    return {"source": source, "folder_sha256": model_fingerprint(folder), "method": saved.get("method"),
            "step": (saved.get("extra") or {}).get("step")}


def prediction_key(source: str) -> str:
    """Cache folder name for a model: its weights and build settings, not its provenance notes (`extra`), so the
    same weights shipped under a new note reuse the cached segmentations."""
    folder = factory.default_model_path() if source == factory.DEFAULT_MODEL else Path(source)
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        content = path.read_bytes()
        if path.name == "method.json":
            settings = {k: v for k, v in json.loads(content).items() if k != "extra"}
            content = json.dumps(settings, sort_keys=True).encode()
        digest.update(path.name.encode() + content)
    return digest.hexdigest()[:16]


def segment(predictor: Predictor, case: Case, organs: list[str], cache: Path | None) -> Segmentation:
    """The model's segmentation of a case, from `cache` when this model already segmented this very volume."""
    scan = MetaTensor(torch.from_numpy(np.ascontiguousarray(case.volume))[None], affine=torch.as_tensor(case.affine))
    key = hashlib.sha256(case.name.encode() + case.volume.tobytes() + np.asarray(case.affine).tobytes())
    stored = None if cache is None else cache / (key.hexdigest()[:16] + ".npz")
    if stored is not None and stored.is_file():
        saved = np.load(stored)
        confidence = dict(zip(organs, saved["confidence"].tolist()))
        return Segmentation(saved["labels"], organs, confidence, saved["affine"], scan)
    predictor.set_volume(scan)
    result = predictor.predict(organs)
    if stored is not None:
        stored.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(stored, labels=result.labels, affine=result.affine,
                            confidence=np.array([result.confidence[o] for o in organs]))
    return result


def samples(case: Case, result: Segmentation) -> tuple[list[dict], int]:
    """One row per organ the model marked (features, found or invented, where from), and how many it left empty."""
    rows, empty = [], 0
    for organ, item in measure(result, CARD, result.scan).items():
        if item.features is None:
            empty += 1
            continue
        mask = result.mask(organ)
        precision = 0.0 if case.truth is None else float((mask & case.truth[organ]).sum() / mask.sum())
        rows.append({"case": case.name, "source": case.source, "kind": case.kind, "organ": organ,
                     "found": precision >= MIN_PRECISION, "precision": round(precision, 3),
                     "volume_ml": round(item.mask.volume_ml, 1), "noise_hu": round(item.mask.noise_hu, 2),
                     **{name: item.features[name] for name in FEATURES}})
    return rows, empty


def fit(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, LogisticRegression]:
    """Standardise and fit a balanced, L2-regularised logistic regression."""
    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale = np.where(scale > 1e-9, scale, 1.0)
    regression = LogisticRegression(C=1.0, class_weight="balanced", max_iter=1000)
    regression.fit((x - mean) / scale, y)
    return mean, scale, regression


def held_out(x: np.ndarray, y: np.ndarray, sources: np.ndarray) -> np.ndarray:
    """Probability of every row from a fit on the other sources only (leave one source out)."""
    out = np.full(len(y), np.nan)
    for source in np.unique(sources):
        test = sources == source
        if len(np.unique(y[~test])) < 2:
            continue
        mean, scale, regression = fit(x[~test], y[~test])
        out[test] = regression.predict_proba((x[test] - mean) / scale)[:, 1]
    return out


def pick_threshold(held_out_probability: np.ndarray, fitted_probability: np.ndarray, y: np.ndarray) -> float:
    """The highest threshold that keeps KEEP_FOUND of the found organs present, both held out and as fitted (the
    lower of the two): calling a real organ absent costs more than keeping an invented one, whose low probability
    the report still shows. It lies midway between the last found organ kept and the one below it, not on the kept
    one's probability, so that a run in another precision cannot flip that organ by rounding."""
    def keeping(probability: np.ndarray) -> float:
        kept = np.sort(probability[y])
        index = int(math.floor((1.0 - KEEP_FOUND) * len(kept)))
        return float(kept[index] if index == 0 else (kept[index] + kept[index - 1]) / 2)
    return min(keeping(held_out_probability), keeping(fitted_probability))


def separation(probability: np.ndarray, y: np.ndarray, threshold: float, rows: list[dict]) -> dict:
    """Held-out figures: AUC (and the model's confidence alone), accuracy at the threshold, per kind of case."""
    called = probability >= threshold
    confidence = np.array([r["confidence"] for r in rows])
    kinds = {}
    for kind in sorted({r["kind"] for r in rows}):
        pick = np.array([r["kind"] == kind for r in rows])
        kinds[kind] = {"masks": int(pick.sum()), "found": int(y[pick].sum()),
                       "found_called_present": int((called & y)[pick].sum()),
                       "invented_called_absent": int((~called & ~y)[pick].sum()), "invented": int((~y)[pick].sum())}
    return {"held_out": "leave one source out", "masks": len(y), "found": int(y.sum()),
            "auc": round(float(roc_auc_score(y, probability)), 4),
            "auc_confidence_alone": round(float(roc_auc_score(y, confidence)), 4),
            "accuracy": round(float(np.mean(called == y)), 4),
            "balanced_accuracy": round(float((np.mean(called[y]) + np.mean(~called[~y])) / 2.0), 4),
            "found_called_present": round(float(np.mean(called[y])), 4),
            "invented_called_absent": round(float(np.mean(~called[~y])), 4), "by_kind": kinds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=factory.DEFAULT_MODEL, help="'default' or a checkpoint folder")
    parser.add_argument("--out", type=Path, default=calibration_path(), help="calibration JSON to write")
    parser.add_argument("--cache", type=Path, default=ROOT / "runs" / "presence_calibration",
                        help="segmentations kept per model, so a re-run only refits ('' for none)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch (default: 2)")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    identity = model_identity(args.model)
    cache = args.cache / prediction_key(args.model) if str(args.cache) else None
    organs = load_card(CARD).names()
    predictor = Predictor(factory.create_model(args.model), device="cpu")
    rows, empty, cases = [], 0, []
    for case in all_cases():
        result = segment(predictor, case, organs, cache)
        found, left = samples(case, result)
        rows += found
        empty += left
        cases.append({"case": case.name, "source": case.source, "kind": case.kind, "shape": list(case.volume.shape),
                      "masks": len(found), "found": sum(r["found"] for r in found)})
        print(f"{case.name}: {len(found)} masks ({sum(r['found'] for r in found)} on a true organ)", flush=True)
    x = np.array([[r[name] for name in FEATURES] for r in rows], dtype=np.float64)
    y = np.array([r["found"] for r in rows], dtype=bool)
    probability = held_out(x, y, np.array([r["source"] for r in rows]))
    mean, scale, regression = fit(x, y)
    threshold = pick_threshold(probability, regression.predict_proba((x - mean) / scale)[:, 1], y)
    report = {
        "format": CALIBRATION_FORMAT, "features": list(FEATURES),
        "mean": mean.round(6).tolist(), "scale": scale.round(6).tolist(),
        "coefficients": regression.coef_[0].round(6).tolist(), "intercept": round(float(regression.intercept_[0]), 6),
        "threshold": round(threshold, 4), "model": identity,
        "data": {"card": CARD, "min_precision_found": MIN_PRECISION, "keep_found": KEEP_FOUND, "empty_masks": empty,
                 "cases": cases,
                 "description": __doc__.split("Usage:")[0].strip()},
        "date": datetime.date.today().isoformat(),
        "separation": separation(probability, y, threshold, rows),
        "command": "python scripts/calibrate_presence.py",
        "rows": [{**r, "held_out_probability": round(float(p), 4)} for r, p in zip(rows, probability)],
    }
    text = json.dumps(report, indent=1) + "\n"
    atomic_write(args.out, lambda temp: Path(temp).write_text(text, encoding="utf-8"))
    print(json.dumps(report["separation"], indent=1))
    print(f"threshold {threshold:.3f}; written {args.out}")


if __name__ == "__main__":
    main()
