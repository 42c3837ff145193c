"""Decathlon datalists: absolute checked paths, case ids, clear errors; seeded, order-free splits by case."""
import json

import pytest

from medclipsam.data.datalists import case_id_from_path, load_datalist, split_cases, train_val_split
from medclipsam.errors import InputError


def write_dataset(root, n=4, with_test=True):
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    training = []
    for i in range(n):
        for folder in ("imagesTr", "labelsTr"):
            (root / folder / f"case_{i:03d}.nii.gz").write_bytes(b"")
        training.append({"image": f"./imagesTr/case_{i:03d}.nii.gz", "label": f"./labelsTr/case_{i:03d}.nii.gz"})
    content = {"name": "toy", "labels": {"0": "background", "1": "liver"}, "training": training}
    if with_test:
        (root / "imagesTs").mkdir()
        (root / "imagesTs" / "case_900.nii").write_bytes(b"")
        content["test"] = ["./imagesTs/case_900.nii"]
    path = root / "dataset.json"
    path.write_text(json.dumps(content))
    return path


def test_load_datalist_absolute_paths_and_case_ids(tmp_path):
    path = write_dataset(tmp_path / "ds")
    items = load_datalist(path)
    assert [item["case_id"] for item in items] == ["case_000", "case_001", "case_002", "case_003"]
    assert items[1]["image"] == str((tmp_path / "ds" / "imagesTr" / "case_001.nii.gz").resolve())
    assert items[1]["label"] == str((tmp_path / "ds" / "labelsTr" / "case_001.nii.gz").resolve())
    test = load_datalist(path, key="test")
    assert test == [{"image": str((tmp_path / "ds" / "imagesTs" / "case_900.nii").resolve()), "case_id": "case_900"}]


def test_case_id_strips_scan_suffixes():
    assert case_id_from_path("/d/liver_7.nii.gz") == "liver_7"
    assert case_id_from_path("/d/liver_7.nii") == "liver_7"
    assert case_id_from_path("/d/ct.v2.nrrd") == "ct.v2"
    assert case_id_from_path("/d/dicom_series_12") == "dicom_series_12"


def test_missing_json_key_and_file_are_named(tmp_path):
    with pytest.raises(InputError, match="datalist file does not exist") as err:
        load_datalist(tmp_path / "nope.json")
    assert err.value.path.endswith("nope.json")

    path = write_dataset(tmp_path / "ds", with_test=False)
    with pytest.raises(InputError, match="no key 'validation'"):
        load_datalist(path, key="validation")

    (tmp_path / "ds" / "labelsTr" / "case_002.nii.gz").unlink()
    with pytest.raises(InputError) as err:
        load_datalist(path)
    assert err.value.path == str(path.resolve())
    assert "labelsTr/case_002.nii.gz" in err.value.problem and "does not exist" in err.value.problem


def test_invalid_json_and_duplicate_case_ids(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{ not json")
    with pytest.raises(InputError, match="not valid JSON"):
        load_datalist(bad)
    path = write_dataset(tmp_path / "ds", n=1, with_test=False)
    (tmp_path / "ds" / "imagesTr" / "case_000.nii").write_bytes(b"")
    content = json.loads(path.read_text())
    content["training"].append({"image": "imagesTr/case_000.nii", "label": "labelsTr/case_000.nii.gz"})
    path.write_text(json.dumps(content))
    with pytest.raises(InputError, match="case id 'case_000' appears twice"):
        load_datalist(path)


def cases(n):
    return [{"case_id": f"c{i:02d}", "image": f"/x/c{i:02d}.nii.gz"} for i in range(n)]


def ids(items):
    return [item["case_id"] for item in items]


@pytest.mark.parametrize("labelled, expected", [(3, 3), (0.25, 3), (0.01, 1), (1.0, 10)])
def test_split_cases_sizes_disjoint_and_complete(labelled, expected):
    items = cases(10)
    lab, unlab = split_cases(items, labelled, seed=1)
    assert len(lab) == expected and len(unlab) == 10 - expected
    assert set(ids(lab)).isdisjoint(ids(unlab)) and set(ids(lab)) | set(ids(unlab)) == set(ids(items))


def test_split_cases_is_seeded_and_independent_of_input_order():
    items = cases(12)
    lab, unlab = split_cases(items, 4, seed=3)
    lab_rev, unlab_rev = split_cases(list(reversed(items)), 4, seed=3)
    assert ids(lab) == ids(lab_rev) and ids(unlab) == ids(unlab_rev)
    assert len({tuple(ids(split_cases(items, 4, seed=s)[0])) for s in range(6)}) > 1


def test_split_cases_refuses_bad_counts():
    for bad in (0, 11, 0.0, 1.5, True, "3"):
        with pytest.raises(ValueError):
            split_cases(cases(10), bad)


def test_train_val_split_by_case():
    items = cases(9)
    train, val = train_val_split(items, 2, seed=5)
    assert len(val) == 2 and len(train) == 7 and set(ids(train)).isdisjoint(ids(val))
    assert ids(train_val_split(list(reversed(items)), 2, seed=5)[1]) == ids(val)
    with pytest.raises(ValueError):
        train_val_split(items, 9)
