"""Scanner phantoms: drawn geometries vary like real CT protocols; anatomy keeps its physical size at any geometry;
table, arms, off-centre patient, field-of-view cropping, contrast phase and noise behave as scanners do."""
from __future__ import annotations

import importlib.util
import json
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

import medclipsam.data.phantom.scanner as scanner_module
from medclipsam.data.concepts import load_card
from medclipsam.data.phantom import (Phantom, ScannerGeometry, make_scanner_phantom, scanner_geometry,
                                     write_phantom_dataset)
from medclipsam.errors import InputError

ORGAN = {name: load_card("phantom").resolve(name).label_id for name in load_card("phantom").names()}
# Low-resolution geometries (fast); physical size does not depend on the grid, so the checks hold at 512 too.
COARSE = ScannerGeometry(matrix=160, pixel_mm=2.5, slice_mm=4.0, slices=60, table="none", noise_hu=0.0)
SEED = 1


def world(p: Phantom, voxels: np.ndarray) -> np.ndarray:
    return voxels @ p.affine[:3, :3].T + p.affine[:3, 3]


def centroid(p: Phantom, mask: np.ndarray) -> np.ndarray:
    return world(p, np.argwhere(mask).mean(axis=0))


def body_mask(p: Phantom, k: int) -> np.ndarray:
    """Slice k's body: soft tissue (gas pockets filled) connected to the patient's centre, opened so that thin
    touching things (table shell, pad cover) come off."""
    tissue = ndimage.binary_opening(ndimage.binary_fill_holes(p.image[:, :, k] > -500), iterations=3)
    parts, _ = ndimage.label(tissue)
    centre = np.round((np.array([*p.geometry.offset_mm, 0.0]) - p.affine[:3, 3]) / np.diag(p.affine)[:3]).astype(int)
    return parts == parts[centre[0], centre[1]]


def volumes_ml(p: Phantom) -> dict[str, float]:
    return {name: float((p.label == i).sum() * np.prod(p.spacing) / 1000.0) for name, i in ORGAN.items()}


@pytest.fixture(scope="module")
def coarse() -> Phantom:
    return make_scanner_phantom(SEED, COARSE)


def test_drawn_geometries_vary_like_scanners() -> None:
    drawn = [scanner_geometry(seed) for seed in range(60)]
    for g in drawn:
        assert g.matrix == 512 and 0.6 <= g.pixel_mm <= 1.0 and 300.0 <= g.fov_mm <= 500.0
        assert 0.6 <= g.slice_mm <= 5.0 and 180.0 - g.slice_mm <= g.slices * g.slice_mm <= 250.0 + g.slice_mm
        assert max(abs(v) for v in g.offset_mm) <= 60.0
        assert g.pad_mm == 0.0 or g.gap_mm == 0.0  # a pad touches the patient
    assert {g.table for g in drawn} == {"curved", "flat"} and {g.arms for g in drawn} == {"up", "down"}
    assert {g.phase for g in drawn} == {"non-contrast", "arterial", "portal venous"}
    assert len({g.slice_mm for g in drawn}) >= 5 and any(g.pad_mm > 0 for g in drawn)
    assert np.mean([np.hypot(*g.offset_mm) > 10.0 for g in drawn]) > 0.5  # patients are seldom centred
    thin = [g.noise_hu for g in drawn if g.slice_mm <= 1.25]
    thick = [g.noise_hu for g in drawn if g.slice_mm >= 5.0]
    assert min(thin) > np.median(thick) and np.median(thin) > 1.5 * np.median(thick)
    assert scanner_geometry(7) == scanner_geometry(7) and scanner_geometry(7) != scanner_geometry(8)


def test_drawn_scanner_phantom_is_a_512_ct_with_an_honest_affine() -> None:
    p = make_scanner_phantom(2)  # geometry drawn from the seed: 512 x 512 x 39 at 0.94 mm, 5 mm slices
    g = p.geometry
    assert g == scanner_geometry(2) and p.image.shape == p.label.shape == (512, 512, g.slices)
    assert p.image.dtype == np.float32 and p.label.dtype == np.uint8 and p.spacing == g.spacing
    assert np.allclose(np.diag(p.affine)[:3], g.spacing) and nib.aff2axcodes(p.affine) == ("R", "A", "S")
    assert np.allclose(world(p, np.array([255.5, 255.5, 0.0]))[:2], 0.0)  # the isocentre mid-slice
    assert p.label_names == load_card("phantom").label_map()
    assert set(np.unique(p.label)) == {0, *ORGAN.values()}
    k = g.slices // 2
    body = body_mask(p, k)
    assert np.allclose(centroid(p, body[:, :, None])[:2], g.offset_mm, atol=12.0)  # where the geometry put it
    assert 30.0 <= float(body.sum()) * g.pixel_mm ** 2 / 100.0 <= 1300.0  # cross-section in cm^2
    median = {name: float(np.median(p.image[p.label == i])) for name, i in ORGAN.items()}
    assert median["aorta"] > 250 and median["aorta"] > median["inferior vena cava"] + 100  # arterial phase
    assert 40 <= median["liver"] <= 110 and median["gallbladder"] < 35
    assert np.percentile(p.image, 99.9) > 450 and (p.image == -1024.0).any()  # bone; padding outside 500 mm


def test_same_patient_at_any_geometry() -> None:
    fine = make_scanner_phantom(SEED, ScannerGeometry(matrix=384, pixel_mm=0.9, slice_mm=5.0, slices=50,
                                                      noise_hu=0.0))
    coarse = make_scanner_phantom(SEED, replace(COARSE, slice_mm=2.0, slices=125, offset_mm=(25.0, -35.0)))
    a, b = volumes_ml(fine), volumes_ml(coarse)
    assert 900.0 <= a["liver"] <= 2200.0 and 60.0 <= a["spleen"] <= 450.0 and 70.0 <= a["left kidney"] <= 250.0
    for name in ORGAN:
        assert b[name] == pytest.approx(a[name], rel=0.04), name
    shift = centroid(coarse, coarse.label == ORGAN["liver"]) - centroid(fine, fine.label == ORGAN["liver"])
    assert np.allclose(shift, [25.0, -35.0, 0.0], atol=1.5)  # the whole patient moves with the offset


def test_same_seed_same_volume_and_different_seeds_differ(coarse: Phantom) -> None:
    again = make_scanner_phantom(SEED, COARSE)
    assert np.array_equal(coarse.image, again.image) and np.array_equal(coarse.label, again.label)
    other = make_scanner_phantom(SEED + 1, COARSE)
    assert not np.array_equal(coarse.label, other.label)


def test_table_sits_below_the_body_unlabelled_with_a_gap_or_a_touching_pad() -> None:
    sharp = replace(COARSE, matrix=320, pixel_mm=1.25, slices=12)  # pixels finer than the 2 mm table shell
    with_gap = make_scanner_phantom(SEED, replace(sharp, table="flat", gap_mm=10.0))
    with_pad = make_scanner_phantom(SEED, replace(sharp, table="curved", gap_mm=0.0, pad_mm=40.0))
    for p in (with_gap, with_pad):
        body = body_mask(p, 6)
        rows = np.where(body.any(axis=0))[0]
        back = rows.min()  # lowest body row (y grows anteriorly)
        shell = (p.image[:, :back, :] > 150).any(axis=2) & (p.label[:, :back, :] == 0).all(axis=2)
        assert shell.any(axis=1).sum() * p.geometry.pixel_mm > 300.0  # a wide plate below the patient
        assert np.array_equal(p.image[:, :back, 0], p.image[:, :back, -1])  # the same in every slice
        assert (p.image[:, rows.max() + 3:, :] < -900).all()  # nothing above the patient
        column = int(np.argwhere(body[:, back]).mean())  # where the back is lowest
        under = p.image[column, :back, 6]
        if p is with_gap:
            assert (under[-7:] < -900).all() and (under[-11:-7] > 150).any()  # 10 mm of air, then the table
        else:
            assert (-950 < under[-20:]).all() and (under[-20:] < -600).all()  # foam pad pressed by the back


def test_arms_down_put_bone_beside_the_body_and_arms_up_leave_the_slices(coarse: Phantom) -> None:
    down = make_scanner_phantom(SEED, replace(COARSE, arms="down", matrix=200))  # 500 mm: arms in the field
    up = make_scanner_phantom(SEED, replace(COARSE, matrix=200))
    arm_bone = (down.image > 500) & (up.image <= 500)
    assert arm_bone.any()
    x = world(down, np.argwhere(arm_bone))[:, 0]
    assert (x > 0).any() and (x < 0).any()  # both sides
    for k in np.unique(np.argwhere(arm_bone)[:, 2])[::5]:
        skin = np.where(body_mask(up, k).any(axis=1))[0]
        columns = np.where(arm_bone[:, :, k].any(axis=1))[0]
        assert ((columns < skin.min()) | (columns > skin.max())).all()  # lateral to the body wall
    skin = np.where(body_mask(up, 30).any(axis=1))[0]
    beside = np.r_[0:skin.min() - 3, skin.max() + 4:up.image.shape[0]]
    assert (up.image[beside] < -500).all()  # arms up: only air beside the body


def test_small_field_of_view_crops_the_body_and_500_mm_shows_air_around_it() -> None:
    small = make_scanner_phantom(SEED, replace(COARSE, matrix=150, pixel_mm=2.0))  # 300 mm
    large = make_scanner_phantom(SEED, replace(COARSE, matrix=200, pixel_mm=2.5))  # 500 mm
    k = 30
    body = body_mask(small, k)
    assert body[0].any() and body[-1].any()  # the body runs off both sides of the image
    assert (large.image[:8, :, :] < -900).all() and (large.image[-8:, :, :] < -900).all()
    assert (large.image[0, 0, :] == -1024.0).all()  # corners outside the 500 mm scanned circle are padding
    assert volumes_ml(small)["liver"] == pytest.approx(volumes_ml(large)["liver"], rel=0.05)


def test_contrast_phase_changes_enhancement_not_anatomy(coarse: Phantom) -> None:
    phases = {phase: make_scanner_phantom(SEED, replace(COARSE, phase=phase))
              for phase in ("non-contrast", "arterial")}
    phases["portal venous"] = coarse
    median = {phase: {name: float(np.median(p.image[p.label == i])) for name, i in ORGAN.items()}
              for phase, p in phases.items()}
    plain, arterial, venous = median["non-contrast"], median["arterial"], median["portal venous"]
    assert plain["aorta"] < 70 and arterial["aorta"] > 250 and 120 < venous["aorta"] < 230
    assert venous["inferior vena cava"] > arterial["inferior vena cava"] + 30 > plain["inferior vena cava"] + 30
    assert venous["liver"] > plain["liver"] + 25 and arterial["right kidney"] > plain["right kidney"] + 80
    assert abs(plain["liver"] - plain["spleen"]) < 25 and plain["liver"] > plain["spleen"] - 5
    for p in phases.values():
        assert np.array_equal(p.label, coarse.label)


def test_noise_has_the_geometry_s_level() -> None:
    sharp = replace(COARSE, matrix=200, pixel_mm=0.8, slices=3)  # sub-mm pixels: the noise grain spans pixels
    clean, noisy = make_scanner_phantom(SEED, sharp), make_scanner_phantom(SEED, replace(sharp, noise_hu=20.0))
    inside = body_mask(clean, 1)
    difference = (noisy.image[:, :, 1] - clean.image[:, :, 1])[inside]
    assert 18.5 <= float(difference.std()) <= 21.5 and abs(float(difference.mean())) < 1.0
    neighbours = np.corrcoef(difference[:-1], difference[1:])[0, 1]
    assert neighbours > 0.2  # correlated grain, as reconstructed CT noise is


def test_body_size_varies_and_organs_stay_adult_sized() -> None:
    tiny = replace(COARSE, matrix=100, pixel_mm=5.0, slices=65)
    widths, livers = [], []
    for seed in range(8):
        p = make_scanner_phantom(seed, tiny)
        widths.append(float(body_mask(p, 32).any(axis=1).sum()) * tiny.pixel_mm)
        livers.append(volumes_ml(p)["liver"])
    assert max(widths) - min(widths) > 40.0 and 240.0 < min(widths) and max(widths) < 420.0  # slim to large
    assert 800.0 < min(livers) and max(livers) < 2300.0


@pytest.mark.parametrize("settings", [{"matrix": 4}, {"pixel_mm": -1.0}, {"slice_mm": 0.0}, {"table": "wood"},
                                      {"arms": "crossed"}, {"phase": "delayed"}, {"offset_mm": (1.0, 2.0, 3.0)},
                                      {"noise_hu": float("nan")}, {"slices": 2.5}])
def test_bad_geometry_is_refused(settings: dict) -> None:
    with pytest.raises(InputError):
        ScannerGeometry(**settings)


def test_bad_seed_or_geometry_argument_is_refused() -> None:
    with pytest.raises(InputError, match="seed"):
        make_scanner_phantom(-1, COARSE)
    with pytest.raises(InputError, match="seed"):
        scanner_geometry(1.5)
    with pytest.raises(InputError, match="ScannerGeometry"):
        make_scanner_phantom(0, {"matrix": 512})


def test_write_scanner_phantom_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scanner_module, "scanner_geometry", lambda seed: replace(COARSE, offset_mm=(seed, 0.0)))
    datalist_path = write_phantom_dataset(tmp_path, n=1, seed=4, n_validation=1, scanner=True)
    datalist = json.loads(datalist_path.read_text())
    geometries = json.loads((tmp_path / "geometry.json").read_text())
    assert "scanner" in datalist["description"] and len(datalist["validation"]) == 1
    for i, item in enumerate(datalist["training"] + datalist["validation"]):
        expected = make_scanner_phantom(4 + i, replace(COARSE, offset_mm=(4.0 + i, 0.0)))
        image, label = nib.load(tmp_path / item["image"]), nib.load(tmp_path / item["label"])
        assert np.allclose(image.affine, expected.affine) and np.array_equal(np.asarray(label.dataobj), expected.label)
        assert geometries[item["image"]] == {"seed": 4 + i, **expected.geometry.to_dict()}
    with pytest.raises(InputError, match="scanner"):
        write_phantom_dataset(tmp_path / "other", n=1, shape=(64, 64, 16), scanner=True)


def test_render_script_draws_scanner_phantoms(tmp_path: Path, coarse: Phantom) -> None:
    script = Path(__file__).parents[1] / "scripts" / "render_phantom_png.py"
    spec = importlib.util.spec_from_file_location("render_phantom_png", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "scanner.png"
    module.save(module.render_scanner({SEED: coarse, SEED + 1: coarse}), out)
    import matplotlib.image
    pixels = matplotlib.image.imread(out)
    assert pixels.shape[0] > 300 and pixels.std() > 0.1
