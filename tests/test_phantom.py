"""CT phantom: determinism, HU statistics, anatomy in RAS world coordinates, and the MSD-layout dataset writer."""
from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medclipsam.data.concepts import card_text, load_card
from medclipsam.data.phantom import Phantom, make_phantom, phantom_affine, write_phantom_dataset
from medclipsam.errors import InputError, OutputExistsError

SEEDS = (0, 1, 2)
SMALL = {"shape": (48, 48, 12), "spacing": (8.0, 8.0, 16.0)}


@pytest.fixture(scope="module")
def phantoms() -> dict[int, Phantom]:
    return {seed: make_phantom(seed) for seed in SEEDS}


def ids() -> dict[str, int]:
    card = load_card("phantom")
    return {name: card.resolve(name).label_id for name in card.names()}


def world_centroid(phantom: Phantom, label_id: int) -> np.ndarray:
    voxels = np.argwhere(phantom.label == label_id).mean(axis=0)
    return phantom.affine[:3, :3] @ voxels + phantom.affine[:3, 3]


def spine_centre(phantom: Phantom) -> np.ndarray:
    """World centroid of dense bone (> 400 HU, present in every slice here)."""
    voxels = np.argwhere(phantom.image > 400).mean(axis=0)
    return phantom.affine[:3, :3] @ voxels + phantom.affine[:3, 3]


def test_same_seed_same_volume_and_different_seeds_differ() -> None:
    a, b, c = make_phantom(7, **SMALL), make_phantom(7, **SMALL), make_phantom(8, **SMALL)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.label, b.label)
    assert not np.array_equal(a.label, c.label)
    assert np.abs(a.image - c.image).mean() > 5.0


def test_default_phantom_is_unchanged_byte_for_byte(phantoms: dict[int, Phantom]) -> None:
    """Tests, the demo and the shipped model depend on make_phantom's exact output: these hashes were taken from
    the single-module phantom before scanner phantoms were added, and must never drift."""
    p = phantoms[0]
    assert hashlib.sha256(p.image.tobytes()).hexdigest() == \
        "72362446ad825ebf2a4807bcfd6aa8f2bf49477ac0d5704a53572a737ec0a0cd"
    assert hashlib.sha256(p.label.tobytes()).hexdigest() == \
        "9fb588f837f29e2d4a9575857d4c272695226f4d89f3078f20440147ded91250"
    assert p.geometry is None


def test_arrays_and_affine(phantoms: dict[int, Phantom]) -> None:
    p = phantoms[0]
    assert p.image.shape == p.label.shape == (128, 128, 32)
    assert p.image.dtype == np.float32 and p.label.dtype == np.uint8
    assert p.spacing == (3.0, 3.0, 6.0)
    assert np.allclose(np.diag(p.affine)[:3], p.spacing)
    assert nib.aff2axcodes(p.affine) == ("R", "A", "S")
    centre = p.affine @ np.array([*(np.array(p.image.shape) - 1) / 2.0, 1.0])
    assert np.allclose(centre[:3], 0.0)
    assert p.label_names == load_card("phantom").label_map()
    assert set(np.unique(p.label)) == {0, *p.label_names}


def test_organ_hu_statistics(phantoms: dict[int, Phantom]) -> None:
    organ = ids()
    for p in phantoms.values():
        median = {name: float(np.median(p.image[p.label == i])) for name, i in organ.items()}
        assert 40 <= median["liver"] <= 100
        assert 40 <= median["spleen"] <= 130
        assert 30 <= median["pancreas"] <= 110
        kidney = min(median["right kidney"], median["left kidney"])
        assert kidney > median["liver"] + 20
        assert median["aorta"] > max(median["right kidney"], median["left kidney"]) + 10
        assert median["gallbladder"] < 35 and median["stomach"] < 40
        assert np.median(p.image[:8, :8, :]) < -900  # air in the corners
        body = p.image[p.image > -500]
        assert np.mean((body > -160) & (body < -50)) > 0.08  # plenty of fat
        assert np.percentile(p.image, 99.9) > 450  # bright cortical bone
        assert 8 <= float(np.std(p.image[:10, :10, :])) <= 25  # CT noise in the air


def test_every_organ_present_and_absent_from_some_slices(phantoms: dict[int, Phantom]) -> None:
    for p in phantoms.values():
        per_slice = np.stack([(p.label == i).any(axis=(0, 1)) for i in p.label_names])
        assert per_slice.any(axis=1).all(), "an organ is missing"
        assert (~per_slice).any(axis=1).all(), "an organ is in every slice"
        assert (per_slice.sum(axis=0) <= 3).any(), "no slice with only a few organs"
        assert (per_slice.sum(axis=0) >= 5).any(), "no slice with many organs"


def test_kidneys_are_big_enough(phantoms: dict[int, Phantom]) -> None:
    for p in phantoms.values():
        for i in (ids()["right kidney"], ids()["left kidney"]):
            widest = max(np.ptp(np.argwhere(p.label[:, :, k] == i)[:, 0]) + 1
                         for k in range(p.label.shape[2]) if (p.label[:, :, k] == i).any())
            assert widest >= 8


def test_left_right_and_levels_in_world_coordinates(phantoms: dict[int, Phantom]) -> None:
    organ = ids()
    for p in phantoms.values():
        c = {name: world_centroid(p, i) for name, i in organ.items()}
        spine = spine_centre(p)
        for name in ("liver", "right kidney", "gallbladder", "inferior vena cava"):
            assert c[name][0] > 0, f"{name} should be on the patient's right (world x > 0)"
        for name in ("spleen", "left kidney", "stomach"):
            assert c[name][0] < 0, f"{name} should be on the patient's left (world x < 0)"
        assert spine[1] < -20 and abs(spine[0]) < 15  # posterior, central
        assert c["aorta"][1] > spine[1] + 10  # anterior to the spine
        assert c["aorta"][0] < spine[0] < c["inferior vena cava"][0]  # aorta left of it, IVC right
        assert c["liver"][2] > c["right kidney"][2] and c["spleen"][2] > c["left kidney"][2]
        assert c["right kidney"][1] < c["liver"][1] and c["left kidney"][1] < c["stomach"][1]


def test_organs_do_not_overlap_bone_or_leave_the_body(phantoms: dict[int, Phantom]) -> None:
    for p in phantoms.values():
        organs = p.label > 0
        solid = organs & (p.label != ids()["stomach"])  # the stomach may hold an air pocket
        assert (p.image[solid] < -300).mean() < 0.002
        assert not (organs & (p.image > 600)).any()


def test_small_grid_keeps_every_organ() -> None:
    p = make_phantom(3, **SMALL)
    assert set(np.unique(p.label)) == {0, *p.label_names}
    assert np.allclose(np.diag(p.affine)[:3], SMALL["spacing"])


@pytest.mark.parametrize("shape, spacing", [((64, 64), (3.0, 3.0, 6.0)), ((4, 64, 32), (3.0, 3.0, 6.0)),
                                             ((64, 64, 32), (3.0, 0.0, 6.0))])
def test_bad_grid_or_seed_is_refused(shape: tuple, spacing: tuple) -> None:
    with pytest.raises(InputError):
        make_phantom(0, shape=shape, spacing=spacing)
    with pytest.raises(InputError, match="seed"):
        make_phantom(-1)


def test_phantom_affine_centres_any_grid() -> None:
    affine = phantom_affine((10, 20, 5), (1.5, 2.0, 4.0))
    assert np.allclose(affine[:3, 3], [-6.75, -19.0, -8.0])


def test_write_phantom_dataset(tmp_path: Path) -> None:
    root = tmp_path / "phantoms"
    datalist_path = write_phantom_dataset(root, n=2, seed=10, **SMALL)
    assert datalist_path == root / "dataset.json"
    datalist = json.loads(datalist_path.read_text())
    card = load_card("phantom")
    assert datalist["labels"] == {"0": "background", **{str(i): n for i, n in card.label_map().items()}}
    assert datalist["modality"] == {"0": "CT"} and datalist["numTraining"] == 2 and datalist["test"] == []
    assert (root / "card.yaml").read_text() == card_text("phantom")
    for i, item in enumerate(datalist["training"]):
        assert item == {"image": f"./imagesTr/phantom_{i:03d}.nii.gz", "label": f"./labelsTr/phantom_{i:03d}.nii.gz"}
        image, label = nib.load(root / item["image"]), nib.load(root / item["label"])
        expected = make_phantom(10 + i, **SMALL)
        assert image.get_data_dtype() == np.int16 and label.get_data_dtype() == np.uint8
        assert np.allclose(image.affine, expected.affine) and np.allclose(label.affine, expected.affine)
        assert np.array_equal(np.asarray(label.dataobj), expected.label)
        assert np.abs(np.asarray(image.dataobj) - expected.image).max() <= 0.5
    assert sorted(p.name for p in root.rglob("*") if p.name.startswith(".")) == []  # no temp files left


def test_write_phantom_dataset_refuses_to_overwrite(tmp_path: Path) -> None:
    write_phantom_dataset(tmp_path, n=1, **SMALL)
    with pytest.raises(OutputExistsError):
        write_phantom_dataset(tmp_path, n=1, **SMALL)
    first = (tmp_path / "labelsTr" / "phantom_000.nii.gz").read_bytes()
    write_phantom_dataset(tmp_path, n=1, seed=5, overwrite=True, **SMALL)
    assert (tmp_path / "labelsTr" / "phantom_000.nii.gz").read_bytes() != first
    with pytest.raises(InputError):
        write_phantom_dataset(tmp_path / "none", n=0)


def test_render_script_draws_the_figure(tmp_path: Path) -> None:
    script = Path(__file__).parents[1] / "scripts" / "render_phantom_png.py"
    spec = importlib.util.spec_from_file_location("render_phantom_png", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    phantom = make_phantom(0)
    axial = module.axial_view(phantom.label, 20)
    liver_cols = np.argwhere(axial == ids()["liver"])[:, 1]
    assert liver_cols.mean() < axial.shape[1] / 2  # patient's right shown on the viewer's left
    out = tmp_path / "phantom.png"
    module.main([str(out), "--seed", "0"])
    import matplotlib.image
    pixels = matplotlib.image.imread(out)
    assert pixels.shape[0] > 300 and pixels.shape[1] > 3 * pixels.shape[0] / 2 and pixels.std() > 0.1
