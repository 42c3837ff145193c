"""`medclipsam segment` run as a subprocess on phantom scans in NIfTI, NRRD and DICOM form (RAS and LPS): outputs
overlay their inputs, reported volumes are voxel count x voxel volume, failures are reported without partial files,
and a killed batch resumes with only the missing scans. Organs with and without a --box in one run; DICOM SEG and
statistics from a DICOM series (the SEG read back equals the NIfTI mask), NIfTI input refused for a SEG."""
import json
import shutil
import signal
import subprocess
import warnings

import highdicom as hd
import matplotlib.image
import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch
from monai.data import MetaTensor

from medclipsam.cli import main
from medclipsam.data.concepts import load_card
from medclipsam.data.io import to_ras
from medclipsam.data.phantom import make_phantom
from medclipsam.errors import InputError
from medclipsam.inference.prompt_args import parse_manual_prompt, place_prompts
from medclipsam.inference.statistics import STATISTICS_COLUMNS

from helpers_scans import SERIES_UID, LPS_TO_RAS, lps_flip, run_cli, sitk_image, tiny_model, write_dicom_series

SHAPE = (48, 48, 8)
LABELS = {"liver": 1, "left kidney": 4}  # the phantom card's label ids
SCANS = ("dicom_lps", "nifti_lps", "nifti_ras", "nrrd_lps", "nrrd_ras")


def input_geometry(path) -> tuple[tuple, np.ndarray]:
    """(shape, RAS affine) of an input scan, read independently of medclipsam."""
    if path.name.endswith(".nii.gz"):
        image = nib.load(path)
        return image.shape, image.affine
    if path.is_dir():
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(path)))
        image = reader.Execute()
    else:
        image = sitk.ReadImage(str(path))
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(image.GetDirection()).reshape(3, 3) * np.asarray(image.GetSpacing())
    lps[:3, 3] = image.GetOrigin()
    return image.GetSize(), LPS_TO_RAS @ lps


def ras_box_mm(label: np.ndarray, value: int, affine: np.ndarray, z_slices: tuple[int, int]) -> str:
    """'x0,y0,z0,x1,y1,z1' world RAS mm box around an organ's in-plane extent over the given slices."""
    xs, ys, _ = np.nonzero(label == value)
    low = affine @ [xs.min(), ys.min(), z_slices[0], 1]
    high = affine @ [xs.max(), ys.max(), z_slices[1], 1]
    return ",".join(f"{v:g}" for v in [*low[:3], *high[:3]])


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    """The same phantom as NIfTI, NRRD and a DICOM folder, stored RAS and LPS; a tiny-model checkpoint."""
    root = tmp_path_factory.mktemp("segment_cli")
    phantom = make_phantom(2, shape=SHAPE)
    hu = np.clip(np.rint(phantom.image), -1024, 3071).astype(np.int16)
    lps_affine = phantom.affine @ lps_flip(SHAPE)
    lps_hu = hu[::-1, ::-1, :].copy()
    inputs = root / "inputs"
    inputs.mkdir()
    nib.save(nib.Nifti1Image(hu, phantom.affine), inputs / "nifti_ras.nii.gz")
    nib.save(nib.Nifti1Image(lps_hu, lps_affine), inputs / "nifti_lps.nii.gz")
    sitk.WriteImage(sitk_image(hu, phantom.affine), str(inputs / "nrrd_ras.nrrd"))
    sitk.WriteImage(sitk_image(lps_hu, lps_affine), str(inputs / "nrrd_lps.nrrd"))
    write_dicom_series(inputs / "dicom_lps", sitk_image(lps_hu, lps_affine))
    (inputs / "corrupt.nii.gz").write_bytes((inputs / "nifti_ras.nii.gz").read_bytes()[:300])
    checkpoint = tiny_model(root / "model")
    boxes = [f"liver={ras_box_mm(phantom.label, 1, phantom.affine, (3, 5))}",
             f"left kidney={ras_box_mm(phantom.label, 4, phantom.affine, (2, 3))}"]
    return {"root": root, "inputs": inputs, "phantom": phantom, "lps_affine": lps_affine, "lps_hu": lps_hu,
            "model": checkpoint,
            "args": ["--prompt", "liver", "--prompt", "left kidney", *sum((["--box", b] for b in boxes), []),
                     "--coords", "ras", "--model", str(checkpoint)]}


@pytest.fixture(scope="module")
def batch(scans):
    """A batch (a folder with five good scans and a corrupt one; one organ name unknown) killed (SIGKILL) right after
    its first scan is written, then re-run to the end."""
    out = scans["root"] / "out"
    args = [str(scans["inputs"]), *scans["args"], "--prompt", "livr", "--out", str(out), "--preview"]
    with open(scans["root"] / "killed.err", "w") as err:
        killed = run_cli(*args, "--quiet", stdout=subprocess.PIPE, stderr=err)
        first = killed.stdout.readline()
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=60)
    assert first.endswith("labels.nii.gz\n"), (scans["root"] / "killed.err").read_text()
    finished = sorted(p.name for p in out.iterdir() if (p / "report.json").is_file())
    assert 1 <= len(finished) < len(SCANS), f"kill came too late: {finished}"
    before = {p: (p.stat().st_mtime_ns, p.stat().st_ino) for name in finished for p in (out / name).iterdir()}
    rerun = run_cli(*args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stdout, stderr = rerun.communicate(timeout=120)
    return {"out": out, "finished_first": finished, "before": before, "returncode": rerun.returncode,
            "stdout": stdout, "stderr": stderr, "summary": json.loads((out / "summary.json").read_text()),
            "tree": sorted(str(p.relative_to(out)) for p in out.rglob("*"))}


def report(folder) -> dict:
    return json.loads((folder / "report.json").read_text())


def test_killed_batch_resumes_with_only_the_missing_scans(batch):
    summary = batch["summary"]
    assert summary["skipped"] == batch["finished_first"]
    assert sorted(summary["done"]) == sorted(set(SCANS) - set(batch["finished_first"]))
    for path, stamp in batch["before"].items():  # the first run's files were not rewritten
        assert (path.stat().st_mtime_ns, path.stat().st_ino) == stamp
    assert len(batch["stdout"].splitlines()) == len(SCANS)  # one label map path per scan, done or skipped


def test_corrupt_scan_and_unknown_organ_fail_alone(scans, batch):
    assert batch["returncode"] == 1, batch["stderr"]
    corrupt = scans["inputs"] / "corrupt.nii.gz"
    lines = batch["stderr"].replace("\r", "\n").splitlines()  # progress bars redraw with carriage returns
    errors = [line for line in lines if line.startswith("medclipsam: error:")]
    assert len(errors) == 2
    assert "'livr'" in errors[0] and "Did you mean: 'liver'" in errors[0]
    assert str(corrupt) in errors[1] and "unreadable or truncated" in errors[1]
    summary = batch["stderr"][batch["stderr"].index("medclipsam segment:"):]
    assert f"{len(SCANS) - len(batch['finished_first'])} done" in summary and "2 failed" in summary
    assert "FAILED --prompt 'livr'" in summary and f"FAILED {corrupt}" in summary
    saved = batch["summary"]
    assert [f["input"] for f in saved["failed"]] == ["--prompt 'livr'", str(corrupt)] and saved["exit_code"] == 1
    files = ["labels.nii.gz", "preview.png", "report.csv", "report.json"]
    assert batch["tree"] == sorted(["summary.json", *SCANS, *(f"{s}/{f}" for s in SCANS for f in files)])
    for name in SCANS:  # nothing partial anywhere, and the unknown organ is in no report
        assert [row["concept"] for row in report(batch["out"] / name)["concepts"]] == ["liver", "left kidney"]


def test_each_label_map_overlays_its_input(scans, batch):
    reference = None
    for name in SCANS:
        source = next(scans["inputs"].glob(f"{name}*"))
        shape, affine = input_geometry(source)
        mask = nib.load(batch["out"] / name / "labels.nii.gz")
        assert mask.shape == tuple(shape)
        np.testing.assert_allclose(mask.affine, affine, atol=1e-4)
        assert nib.aff2axcodes(mask.affine) == nib.aff2axcodes(affine) == tuple(name[-3:].upper())
        # the same phantom in every form: in world space every label map must be the same, voxel for voxel
        canonical = np.asarray(nib.as_closest_canonical(mask).dataobj)
        reference = canonical if reference is None else reference
        np.testing.assert_array_equal(canonical, reference)
    assert set(np.unique(reference)) == {0, *LABELS.values()}


def test_reported_volumes_are_voxel_count_times_voxel_volume(scans, batch):
    spacing_ml = float(np.prod(scans["phantom"].spacing)) / 1000
    for name in SCANS:
        folder = batch["out"] / name
        labels = np.asarray(nib.load(folder / "labels.nii.gz").dataobj)
        rows = {row["concept"]: row for row in report(folder)["concepts"]}
        csv_lines = (folder / "report.csv").read_text().splitlines()
        assert csv_lines[0].startswith("prompt,concept,label,present,voxels,volume_ml") and len(csv_lines) == 3
        assert set(rows) == set(LABELS)
        for concept, value in LABELS.items():
            mask = labels == value
            row = rows[concept]
            assert row["label"] == value and row["voxels"] == int(mask.sum()) > 0
            assert row["volume_ml"] == pytest.approx(mask.sum() * spacing_ml, abs=5e-4)
            slices = np.flatnonzero(mask.any(axis=(0, 1)))
            assert (row["first_slice"], row["last_slice"]) == (slices[0], slices[-1])
        assert {rows["liver"]["first_slice"], rows["liver"]["last_slice"]} <= {3, 4, 5}  # inside its box


def test_preview_shows_coloured_contours(batch):
    for name in SCANS:
        image = matplotlib.image.imread(batch["out"] / name / "preview.png")
        assert image.shape[0] > 100
        rgb = image[..., :3]
        assert (np.abs(rgb[..., 0] - rgb[..., 2]) > 0.3).sum() > 20  # contours in colour on a grey scan


def test_voxel_boxes_of_a_flipped_file_give_the_world_box_result(scans, batch, tmp_path):
    # the boxes the batch gave in RAS mm, as voxel indices of the LPS file: the same label map is expected
    to_voxels = np.linalg.inv(scans["lps_affine"])
    boxes = []
    for text in scans["args"][5:8:2]:
        organ, _, numbers = text.partition("=")
        corners = np.c_[np.array(numbers.split(","), dtype=float).reshape(2, 3), np.ones(2)] @ to_voxels.T
        voxels = np.rint(corners[:, :3])
        boxes += ["--box", f"{organ}=" + ",".join(f"{v:g}" for v in [*voxels.min(0), *voxels.max(0)])]
    out = tmp_path / "out"
    code = main(["segment", str(scans["inputs"] / "nifti_lps.nii.gz"), "--prompt", "liver", "--prompt", "left kidney",
                 *boxes, "--model", str(scans["model"]), "--out", str(out), "--quiet"])
    assert code == 0
    np.testing.assert_array_equal(np.asarray(nib.load(out / "nifti_lps" / "labels.nii.gz").dataobj),
                                  np.asarray(nib.load(batch["out"] / "nifti_lps" / "labels.nii.gz").dataobj))


def test_rerun_with_other_settings_changes_nothing_without_overwrite(scans, batch, tmp_path, capsys):
    out = shutil.copytree(batch["out"], tmp_path / "out")
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/*")}
    code = main(["segment", str(scans["inputs"]), *scans["args"], "--window", "liver", "--preview", "--out", str(out),
                 "--quiet"])
    assert code == 2  # no scan could be done
    err = capsys.readouterr().err
    assert err.count("other settings (window differ); pass --overwrite") == 2 * len(SCANS)  # its line + summary
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/*")} == stamps
    code = main(["segment", str(scans["inputs"] / "nifti_ras.nii.gz"), *scans["args"], "--out", str(out),
                 "--overwrite", "--quiet"])
    assert code == 0
    assert (out / "nifti_ras" / "labels.nii.gz").stat().st_mtime_ns > stamps[out / "nifti_ras" / "labels.nii.gz"]
    assert not (out / "nifti_ras" / "preview.png").exists()  # the old folder was replaced, not merged
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_test_time_augmentation_is_a_setting_of_the_result(scans, tmp_path, capsys):
    """--tta: organs found by name are averaged over five views; the labels still overlay the scan, and the option is
    recorded with the result, so a later run without it does not take the scan as done."""
    common = [str(scans["inputs"] / "nifti_lps.nii.gz"), "--prompt", "liver", "--model", str(scans["model"]), "--quiet"]
    assert main(["segment", *common, "--tta", "--out", str(tmp_path / "tta")]) == 0
    written = nib.load(tmp_path / "tta" / "nifti_lps" / "labels.nii.gz")
    assert written.shape == SHAPE and np.allclose(written.affine, scans["lps_affine"])
    assert report(tmp_path / "tta" / "nifti_lps")["settings"]["test_time_augmentation"] is True
    assert main(["segment", *common, "--out", str(tmp_path / "tta")]) == 2
    assert "other settings (test_time_augmentation differ)" in capsys.readouterr().err


@pytest.mark.parametrize("flag, setting", [("--no-slice-gate", "slice_gate"), ("--no-organ-offsets", "organ_offsets")])
def test_turning_a_text_only_calibration_off_is_a_setting_of_the_result(scans, tmp_path, capsys, flag, setting):
    common = [str(scans["inputs"] / "nifti_lps.nii.gz"), "--prompt", "liver", "--model", str(scans["model"]), "--quiet"]
    assert main(["segment", *common, flag, "--out", str(tmp_path / "raw")]) == 0
    assert report(tmp_path / "raw" / "nifti_lps")["settings"][setting] is False
    assert main(["segment", *common, "--out", str(tmp_path / "raw")]) == 2
    assert f"other settings ({setting} differ)" in capsys.readouterr().err


def test_the_demo_hands_test_time_augmentation_to_segment(scans, tmp_path):
    from medclipsam.experiments.demos import run_demo

    rows = run_demo(tmp_path, model=str(scans["model"]), quiet=True, progress=lambda _: None,
                    test_time_augmentation=True)
    assert {row["method"] for row in rows} == {f"clip_guided_sam (text-only, test-time augmentation, {scans['model']})"}
    assert report(tmp_path / "segmentation" / "phantom_ct")["settings"]["test_time_augmentation"] is True


def test_points_prompt_only_their_slices(scans, tmp_path):
    # voxel indices of the LPS file: a liver point on the first and on the last of its slices
    lps_label = scans["phantom"].label[::-1, ::-1, :]
    present = np.flatnonzero((lps_label == 1).any(axis=(0, 1)))
    ends = (int(present[0]), int(present[-1]))
    assert ends[1] - ends[0] > 1
    points = []
    for z in ends:
        xs, ys = np.nonzero(lps_label[..., z] == 1)
        points += ["--point", f"liver={int(np.median(xs))},{int(np.median(ys))},{z}"]
    out = tmp_path / "out"
    code = main(["segment", str(scans["inputs"] / "nifti_lps.nii.gz"), "--prompt", "liver", *points,
                 "--model", str(scans["model"]), "--out", str(out), "--quiet"])
    assert code == 0
    labels = np.asarray(nib.load(out / "nifti_lps" / "labels.nii.gz").dataobj)
    assert set(np.flatnonzero(labels.any(axis=(0, 1)))) == set(ends)  # the slices between are not prompted
    row = report(out / "nifti_lps")["concepts"][0]
    assert (row["first_slice"], row["last_slice"], row["voxels"]) == (*ends, int((labels == 1).sum()))


def test_box_and_point_coordinates_agree_in_every_space():
    affine = np.diag([-0.8, -0.9, 2.5, 1.0])
    affine[:3, 3] = [40.0, 30.0, -10.0]
    native = MetaTensor(torch.zeros(1, 20, 16, 6), affine=torch.as_tensor(affine))
    ras = to_ras(native)
    voxel_box = np.array([2, 3, 1, 9, 12, 4], dtype=float)
    corners = np.c_[voxel_box.reshape(2, 3), np.ones(2)] @ affine.T
    mm = {"voxel": voxel_box, "ras": corners[:, :3].ravel(), "lps": (corners @ LPS_TO_RAS)[:, :3].ravel()}
    placed = set()
    for space, values in mm.items():
        text = "liver=" + ",".join(f"{v:g}" for v in np.r_[np.minimum(*values.reshape(2, 3)),
                                                                np.maximum(*values.reshape(2, 3))])
        prompt = parse_manual_prompt(text, "box", ["liver"])
        boxes = place_prompts([prompt], {"liver": "liver"}, space, affine, np.asarray(ras.affine), ras.shape[1:], "s")
        placed.add(boxes.boxes["liver"])
    assert placed == {(20 - 1 - 9, 16 - 1 - 12, 1, 20 - 1 - 2, 16 - 1 - 3, 4)}  # x and y flipped onto RAS
    point = parse_manual_prompt("7,5,2", "point", ["liver"])
    assert place_prompts([point], {"liver": "liver"}, "voxel", affine, np.asarray(ras.affine), ras.shape[1:],
                         "s").points == {"liver": [(12, 10, 2)]}
    outside = parse_manual_prompt("liver=7,5,9", "point", ["liver"])
    with pytest.raises(InputError, match="lies outside the scan"):
        place_prompts([outside], {"liver": "liver"}, "voxel", affine, np.asarray(ras.affine), ras.shape[1:], "s")


def test_a_box_far_outside_the_scan_is_refused_without_overflow():
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    ras = to_ras(MetaTensor(torch.zeros(1, 20, 16, 6), affine=torch.as_tensor(affine)))
    prompt = parse_manual_prompt("liver=-1e6,-1e6,-1e6,1e6,-1e6,1e6", "box", ["liver"])  # the largest values allowed
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow warning on the way
        with pytest.raises(InputError, match="lies outside the scan") as raised:
            place_prompts([prompt], {"liver": "liver"}, "ras", affine, np.asarray(ras.affine), ras.shape[1:], "s")
    assert "RAS voxels [-1.25e+06, -1.25e+06, -400000]..[1.25e+06, -1.25e+06, 400000]" in str(raised.value)


def test_argument_errors_stop_before_any_work(scans, tmp_path, capsys):
    scan = str(scans["inputs"] / "nifti_ras.nii.gz")
    assert main(["segment", scan, "--prompt", "livr", "--out", str(tmp_path / "a")]) == 2
    assert "nothing to do" in capsys.readouterr().err
    assert main(["segment", scan, "--prompt", "liver", "--box", "spleen=1,1,1,2,2,2", "--out", str(tmp_path)]) == 2
    assert "'spleen', which no --prompt asks for" in capsys.readouterr().err
    assert main(["segment", scan, "--prompt", "liver", "--box", "liver=1,1,1,2,2,2", "--point", "liver=1,1,1",
                 "--out", str(tmp_path)]) == 2
    assert "'liver' has 1 --box and 1 --point" in capsys.readouterr().err
    uncoded = tmp_path.parent / f"{tmp_path.name}-uncoded.yaml"
    uncoded.write_text("name: uncoded\ntitle: t\nsource: s\nlicence: l\nmodality: CT\nlabels:\n  1: {name: liver}\n")
    assert main(["segment", scan, "--prompt", "liver", "--card", str(uncoded), "--output-type", "both",
                 "--out", str(tmp_path)]) == 2
    assert "card 'uncoded' has no SNOMED CT code for 'liver'" in capsys.readouterr().err
    assert main(["segment", scan, "--prompt", "liver", "--box", "liver=1,1,1,2,2", "--out", str(tmp_path)]) == 2
    assert "needs 6 numbers (X0,Y0,Z0,X1,Y1,Z1), got 5" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_default_model_is_used_once_installed(scans, tmp_path, monkeypatch, capsys):
    import medclipsam.models.factory as factory

    scan = str(scans["inputs"] / "nifti_ras.nii.gz")
    monkeypatch.setattr(factory, "default_model_path", lambda: tmp_path / "not_shipped")
    assert main(["segment", scan, "--prompt", "liver", "--box", "liver=20,15,3,30,30,5",
                 "--out", str(tmp_path / "a"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "no default model is installed" in err and "pass a model folder" in err
    assert not (tmp_path / "a" / "nifti_ras").exists()
    monkeypatch.setattr(factory, "default_model_path", lambda: scans["model"])
    assert main(["segment", scan, "--prompt", "liver", "--box", "liver=20,15,3,30,30,5",
                 "--out", str(tmp_path / "b"), "--quiet"]) == 0
    assert report(tmp_path / "b" / "nifti_ras")["settings"]["model"] == f"default ({scans['model']})"


def test_organs_without_a_box_are_segmented_by_name_in_the_same_run(scans, tmp_path):
    scan = str(scans["inputs"] / "nifti_ras.nii.gz")
    liver_box = scans["args"][5]
    common = ["--coords", "ras", "--model", str(scans["model"]), "--quiet"]
    runs = {"mixed": ["--prompt", "liver", "--prompt", "left kidney", "--box", liver_box],
            "box": ["--prompt", "liver", "--box", liver_box], "name": ["--prompt", "left kidney"]}
    labels = {}
    for run, args in runs.items():
        assert main(["segment", scan, *args, *common, "--out", str(tmp_path / run)]) == 0
        labels[run] = np.asarray(nib.load(tmp_path / run / "nifti_ras" / "labels.nii.gz").dataobj)
    mixed = report(tmp_path / "mixed" / "nifti_ras")
    assert mixed["mode"] == "text+manual" and report(tmp_path / "name" / "nifti_ras")["mode"] == "text"
    assert [(r["concept"], r["segmented_by"]) for r in mixed["concepts"]] == [("liver", "box"), ("left kidney", "name")]
    liver, kidney = labels["mixed"] == LABELS["liver"], labels["mixed"] == LABELS["left kidney"]
    np.testing.assert_array_equal(liver, labels["box"] == LABELS["liver"])  # as prompted alone
    np.testing.assert_array_equal(kidney, (labels["name"] == LABELS["left kidney"]) & ~liver)  # the box wins overlaps
    for row in mixed["concepts"]:  # an organ found nowhere says so
        assert row["present"] == (row["voxels"] > 0)
        if not row["present"]:
            assert row["volume_ml"] == 0.0 and row["confidence"] is None and row["first_slice"] is None


def _seg_frames(path) -> dict[tuple[str, int], np.ndarray]:
    """(source SOP instance UID, segment number) -> that frame's pixels, read with highdicom."""
    seg = hd.seg.segread(path)
    uids = [f"{SERIES_UID}.{k + 1}" for k in range(SHAPE[2])]
    numbers = [s.SegmentNumber for s in seg.SegmentSequence]
    pixels = seg.get_pixels_by_source_instance(uids, segment_numbers=numbers, assert_missing_frames_are_empty=True)
    return {(uid, n): pixels[k, ..., j] for k, uid in enumerate(uids) for j, n in enumerate(numbers)}


def test_dicom_seg_and_statistics_for_a_dicom_series(scans, tmp_path, capsys):
    out = tmp_path / "out"
    series, prompts = str(scans["inputs"] / "dicom_lps"), [*scans["args"], "--prompt", "spleen"]
    outputs = ["--output-type", "both", "--statistics", "--out", str(out), "--quiet"]
    assert main(["segment", series, str(scans["inputs"] / "nifti_ras.nii.gz"), *prompts, *outputs]) == 1
    # the NIfTI input cannot have a SEG; the series is done
    err = capsys.readouterr().err
    assert "nifti_ras.nii.gz: is not a DICOM series, and --output-type both writes a DICOM SEG" in err
    assert sorted(p.name for p in out.iterdir()) == ["dicom_lps", "summary.json"]
    folder = out / "dicom_lps"
    assert sorted(p.name for p in folder.iterdir()) == ["labels.nii.gz", "report.csv", "report.json",
                                                       "segmentation.dcm"]
    saved = report(folder)
    rows = {row["concept"]: row for row in saved["concepts"]}
    labels = np.asarray(nib.load(folder / "labels.nii.gz").dataobj)
    seg = pydicom.dcmread(folder / "segmentation.dcm")
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == SERIES_UID
    assert seg.FrameOfReferenceUID == f"{SERIES_UID}.0"
    card = load_card("phantom")
    present = [name for name, row in rows.items() if row["present"]]
    assert {"liver", "left kidney"} <= set(present)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == sorted(present, key=lambda n: rows[n]["label"])
    for segment in seg.SegmentSequence:
        code = segment.SegmentedPropertyTypeCodeSequence[0]
        assert code.CodingSchemeDesignator == "SCT"
        assert code.CodeValue == card.resolve(segment.SegmentLabel).coding.type.value
        assert rows[segment.SegmentLabel]["dicom_seg_segment"] == segment.SegmentNumber
    frames = _seg_frames(folder / "segmentation.dcm")
    for k in range(SHAPE[2]):  # slice k of the series is the mask's slice k (rows: y, columns: x)
        for segment in seg.SegmentSequence:
            expected = labels[:, :, k].T == rows[segment.SegmentLabel]["label"]
            np.testing.assert_array_equal(frames[(f"{SERIES_UID}.{k + 1}", segment.SegmentNumber)], expected)
    assert saved["dicom_seg"]["omitted"] == [n for n, row in rows.items() if not row["present"]]
    for name in saved["dicom_seg"]["omitted"]:
        assert rows[name]["dicom_seg_segment"] is None and rows[name]["volume_ml"] == 0.0
    header = (folder / "report.csv").read_text().splitlines()[0].split(",")
    assert header[:4] == ["prompt", "concept", "label", "present"] and set(STATISTICS_COLUMNS) <= set(header)
    liver = labels == LABELS["liver"]
    assert rows["liver"]["intensity_mean"] == pytest.approx(scans["lps_hu"][liver].mean(), abs=1e-3)
    assert rows["liver"]["components"] >= 1
    assert main(["segment", series, *prompts, "--out", str(out), "--quiet"]) == 2  # settings are fingerprinted
    assert "other settings (output_type, statistics differ)" in capsys.readouterr().err


def test_dicom_seg_alone_and_nothing_found(scans, tmp_path, capsys):
    series = str(scans["inputs"] / "dicom_lps")
    assert main(["segment", series, *scans["args"], "--output-type", "dicom_seg", "--out", str(tmp_path / "a"),
                 "--quiet"]) == 0
    folder = tmp_path / "a" / "dicom_lps"
    assert capsys.readouterr().out.strip() == str(folder / "segmentation.dcm")
    assert sorted(p.name for p in folder.iterdir()) == ["report.csv", "report.json", "segmentation.dcm"]
    assert report(folder)["labels"] is None
    empty = ["--prompt", "liver", "--prompt", "spleen", "--model", "empty", "--quiet"]
    assert main(["segment", series, *empty, "--output-type", "both", "--out", str(tmp_path / "b")]) == 0
    saved = report(tmp_path / "b" / "dicom_lps")
    assert saved["dicom_seg"]["file"] is None and saved["dicom_seg"]["omitted"] == ["liver", "spleen"]
    assert [(r["present"], r["volume_ml"]) for r in saved["concepts"]] == [(False, 0.0), (False, 0.0)]
    assert not (tmp_path / "b" / "dicom_lps" / "segmentation.dcm").exists()
    capsys.readouterr()
    assert main(["segment", series, *empty, "--output-type", "dicom_seg", "--out", str(tmp_path / "c")]) == 2
    assert "no requested organ was found in this scan, and a DICOM SEG cannot hold empty segments" in \
        capsys.readouterr().err
