"""Concept cards: every shipped card is valid, label ids are the datasets' real ones, and names resolve."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from medclipsam.data.concepts import available_cards, card_text, load_card, normalise
from medclipsam.data.snomed import SEGMENTATION_CATEGORIES, verhoeff_valid
from medclipsam.errors import InputError, UnknownConceptError

MSD_LABELS = {
    "msd_brain_tumour": {1: "oedema", 2: "non-enhancing tumour", 3: "enhancing tumour"},
    "msd_heart": {1: "left atrium"},
    "msd_liver": {1: "liver", 2: "liver tumour"},
    "msd_hippocampus": {1: "anterior hippocampus", 2: "posterior hippocampus"},
    "msd_prostate": {1: "prostate peripheral zone", 2: "prostate transition zone"},
    "msd_lung": {1: "lung tumour"},
    "msd_pancreas": {1: "pancreas", 2: "pancreas tumour"},
    "msd_hepatic_vessel": {1: "hepatic vessel", 2: "liver tumour"},
    "msd_spleen": {1: "spleen"},
    "msd_colon": {1: "colon cancer"},
}
BTCV = ["spleen", "right kidney", "left kidney", "gallbladder", "esophagus", "liver", "stomach", "aorta",
        "inferior vena cava", "portal vein and splenic vein", "pancreas", "right adrenal gland", "left adrenal gland"]
AMOS = ["spleen", "right kidney", "left kidney", "gallbladder", "esophagus", "liver", "stomach", "aorta",
        "inferior vena cava", "pancreas", "right adrenal gland", "left adrenal gland", "duodenum", "urinary bladder",
        "prostate or uterus"]
REQUIRED = {"phantom", "btcv", "amos", "totalsegmentator", *MSD_LABELS}


def write_card(path: Path, **overrides: object) -> Path:
    card = {"name": "mini", "title": "Mini", "source": "test", "licence": "CC0", "modality": "CT",
            "labels": {1: {"name": "liver", "synonyms": ["hepar"]}, 2: {"name": "left kidney"}}}
    card.update(overrides)
    path.write_text(yaml.safe_dump(card), encoding="utf-8")
    return path


def test_all_required_cards_are_shipped() -> None:
    assert REQUIRED <= set(available_cards())


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_card_is_well_formed(name: str) -> None:
    card = load_card(name)
    assert card.name == name
    assert card.title and card.source and card.licence and card.modality in {"CT", "MR"}
    assert card.splits and card.preprocessing
    ids = list(card.concepts)
    assert all(isinstance(i, int) and i > 0 for i in ids) and len(set(ids)) == len(ids)
    names = card.names()
    assert len(set(names)) == len(names)
    assert all(n == n.strip().lower() for n in names)
    owner: dict[str, int] = {}
    for concept in card.concepts.values():
        assert concept.label_id in card.concepts
        for alias in concept.all_names():
            key = normalise(alias)
            assert owner.setdefault(key, concept.label_id) == concept.label_id, f"{alias!r} names two concepts"
            assert card.resolve(alias) == concept


def test_yaml_ids_are_not_silently_merged() -> None:
    raw = yaml.safe_load(card_text("totalsegmentator"))
    assert sorted(raw["labels"]) == list(range(1, 118))


@pytest.mark.parametrize("name, labels", sorted(MSD_LABELS.items()))
def test_msd_label_maps(name: str, labels: dict[int, str]) -> None:
    card = load_card(name)
    assert card.label_map() == labels
    assert card.licence == "CC-BY-SA 4.0"


def test_btcv_and_amos_real_label_ids() -> None:
    assert load_card("btcv").label_map() == dict(enumerate(BTCV, start=1))
    assert load_card("amos").label_map() == dict(enumerate(AMOS, start=1))
    assert load_card("amos").resolve("postcava").label_id == 9
    assert load_card("btcv").resolve("IVC").label_id == 9


def test_totalsegmentator_ids_and_original_names() -> None:
    card = load_card("totalsegmentator")
    assert len(card.concepts) == 117
    original = {"spleen": 1, "kidney_right": 2, "adrenal_gland_left": 9, "lung_middle_lobe_right": 13,
                "urinary_bladder": 21, "vertebrae_S1": 26, "vertebrae_L1": 31, "vertebrae_C1": 50, "aorta": 52,
                "inferior_vena_cava": 63, "portal_vein_and_splenic_vein": 64, "iliac_vena_left": 67,
                "clavicula_right": 74, "autochthon_left": 86, "iliopsoas_right": 89, "rib_left_1": 92,
                "rib_right_12": 115, "costal_cartilages": 117}
    for word, label_id in original.items():
        assert card.resolve(word).label_id == label_id, word
    assert card.by_id(2).name == "right kidney"


@pytest.mark.parametrize("name", ["phantom", "btcv", "amos", "totalsegmentator"])
def test_left_kidney_spellings(name: str) -> None:
    card = load_card(name)
    expected = card.resolve("left kidney")
    for word in ["kidney_left", "L kidney", "Left-Kidney", "  LEFT   kidney ", "kidney, left"]:
        assert card.resolve(word) == expected, word
    assert card.resolve("R kidney") != expected


def test_card_accessors() -> None:
    card = load_card("phantom")
    assert card.names()[:4] == ["liver", "spleen", "right kidney", "left kidney"]
    assert card.label_map()[5] == "aorta"
    assert card.by_id(8).name == "inferior vena cava" and card.resolve("ivc").label_id == 8
    with pytest.raises(UnknownConceptError, match=r"label id 99 \(card ids run 1\.\.9\)"):
        card.by_id(99)


def test_unknown_word_lists_close_names() -> None:
    with pytest.raises(UnknownConceptError) as info:
        load_card("phantom").resolve("kidny")
    assert info.value.word == "kidny" and info.value.card == "phantom"
    assert set(info.value.close) == {"right kidney", "left kidney"}
    assert "right kidney" in str(info.value)
    with pytest.raises(UnknownConceptError) as info:
        load_card("totalsegmentator").resolve("vertebra")
    assert len(info.value.close) == 5 and all(c.startswith("vertebra") for c in info.value.close)
    with pytest.raises(UnknownConceptError) as info:
        load_card("btcv").resolve("brain")
    assert info.value.close == []


def test_unknown_card_lists_available() -> None:
    with pytest.raises(InputError) as info:
        load_card("no_such_dataset")
    assert "btcv" in str(info.value) and "phantom" in str(info.value)
    with pytest.raises(InputError, match="does not exist"):
        load_card(Path("/nonexistent/card.yaml"))


def test_load_card_from_path(tmp_path: Path) -> None:
    card = load_card(write_card(tmp_path / "mini.yaml"))
    assert card.label_map() == {1: "liver", 2: "left kidney"}
    assert card.resolve("Hepar").label_id == 1


@pytest.mark.parametrize("overrides, field", [
    ({"licence": ""}, "licence"),
    ({"labels": {}}, "labels"),
    ({"labels": {"one": {"name": "liver"}}}, "labels"),
    ({"labels": {0: {"name": "background"}}}, "background"),
    ({"labels": {1: {"synonyms": ["x"]}}}, "labels.1.name"),
    ({"labels": {1: {"name": "liver", "synonyms": "hepar"}}}, "labels.1.synonyms"),
    ({"labels": {1: {"name": "liver"}, 2: {"name": "spleen", "synonyms": ["Liver"]}}}, "same word"),
])
def test_malformed_card_names_the_problem(tmp_path: Path, overrides: dict, field: str) -> None:
    path = write_card(tmp_path / "bad.yaml", **overrides)
    with pytest.raises(InputError) as info:
        load_card(path)
    assert str(path) in str(info.value) and field in str(info.value)


def test_duplicate_yaml_key_and_bad_syntax(tmp_path: Path) -> None:
    dup = tmp_path / "dup.yaml"
    dup.write_text("name: d\ntitle: t\nsource: s\nlicence: l\nmodality: CT\nlabels:\n  1: {name: a}\n  1: {name: b}\n")
    with pytest.raises(InputError, match="duplicate key 1 at line 8"):
        load_card(dup)
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n")
    with pytest.raises(InputError, match="not valid YAML"):
        load_card(broken)


# ---- SNOMED CT codes for DICOM SEG ----------------------------------------------------------------------------

CODED = {  # card, concept -> (category, type, type modifier, region, region modifier)
    ("phantom", "liver"): ("91723000", "10200004", None, None, None),
    ("btcv", "right adrenal gland"): ("91723000", "23451007", "24028007", None, None),
    ("amos", "urinary bladder"): ("91723000", "89837001", None, None, None),
    ("totalsegmentator", "left kidney"): ("91723000", "64033007", "7771000", None, None),
    ("totalsegmentator", "vertebra l1"): ("91723000", "66794005", None, None, None),
    ("totalsegmentator", "vertebra c1"): ("91723000", "14806007", None, None, None),
    ("totalsegmentator", "right rib 12"): ("91723000", "43993008", "24028007", None, None),
    ("totalsegmentator", "left atrial appendage"): ("91723000", "33626005", None, None, None),
    ("totalsegmentator", "left kidney cyst"): ("49755003", "367643001", None, "64033007", "7771000"),
    ("msd_liver", "liver tumour"): ("49755003", "108369006", None, "10200004", None),
    ("msd_brain_tumour", "oedema"): ("49755003", "79654002", None, "12738006", None),
    ("msd_prostate", "prostate transition zone"): ("91723000", "399384005", None, None, None),
}
APPROXIMATE = [("btcv", "portal vein and splenic vein"), ("totalsegmentator", "left hip bone"),
               ("totalsegmentator", "costal cartilages"), ("amos", "prostate or uterus"),
               ("msd_hippocampus", "anterior hippocampus"), ("msd_brain_tumour", "enhancing tumour")]


def _value(code) -> str | None:
    return None if code is None else code.value


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_every_shipped_label_has_a_valid_snomed_coding(name: str) -> None:
    card = load_card(name)
    assert card.coding_scheme is not None
    assert card.coding_scheme.designator == "SCT" and 0 < len(card.coding_scheme.version) <= 16
    for concept in card.concepts.values():
        coding = concept.coding
        assert coding is not None, concept.name
        assert SEGMENTATION_CATEGORIES[coding.category.value] == coding.category.meaning
        for code in (coding.type, coding.type_modifier, coding.region, coding.region_modifier):
            assert code is None or (verhoeff_valid(code.value) and code.meaning), concept.name


@pytest.mark.parametrize("card_name, concept, expected", [(*key, value) for key, value in CODED.items()])
def test_known_codes(card_name: str, concept: str, expected: tuple) -> None:
    coding = load_card(card_name).resolve(concept).coding
    fields = (coding.category, coding.type, coding.type_modifier, coding.region, coding.region_modifier)
    assert tuple(_value(code) for code in fields) == expected


@pytest.mark.parametrize("card_name, concept", APPROXIMATE)
def test_approximate_codes_say_so(card_name: str, concept: str) -> None:
    assert load_card(card_name).resolve(concept).coding.note


def test_ribs_and_vertebrae_have_a_code_per_level() -> None:
    card = load_card("totalsegmentator")
    ribs = {card.resolve(f"left rib {n}").coding.type.value for n in range(1, 13)}
    vertebrae = {concept.coding.type.value for concept in card.concepts.values() if concept.name.startswith("vertebra")}
    assert len(ribs) == 12 and len(vertebrae) == 25
    assert all(card.resolve(f"right rib {n}").coding.type_modifier.meaning == "Right" for n in range(1, 13))


def test_verhoeff_check_digit() -> None:
    assert all(verhoeff_valid(code) for code in ("10200004", "7771000", "24028007", "123037004", "49755003"))
    assert not any(verhoeff_valid(code) for code in ("10200005", "10200040", "7771001"))


def test_cards_without_codes_still_load(tmp_path: Path) -> None:
    card = load_card(write_card(tmp_path / "plain.yaml"))
    assert card.coding_scheme is None and all(c.coding is None for c in card.concepts.values())


LIVER_CODE = {"category": "91723000 |Anatomical Structure|", "type": "10200004 |Liver|"}
SCHEME = {"designator": "SCT", "version": "20240701"}


@pytest.mark.parametrize("code, scheme, problem", [
    ({**LIVER_CODE, "type": "10200005 |Liver|"}, SCHEME, "10200005 is not a valid SNOMED CT concept identifier"),
    ({**LIVER_CODE, "type": "Liver"}, SCHEME, "code.type 'Liver' is not written as"),
    ({**LIVER_CODE, "type": "10200004 Liver"}, SCHEME, "is not written as"),
    ({"type": "10200004 |Liver|"}, SCHEME, "'code.category' is missing"),
    ({**LIVER_CODE, "category": "123037004 |Body structure|"}, SCHEME, "not a DICOM segmentation property category"),
    ({**LIVER_CODE, "category": "91723000 |Tissue|"}, SCHEME, "not a DICOM segmentation property category"),
    ({**LIVER_CODE, "modifer": "7771000 |Left|"}, SCHEME, "unknown field(s) modifer"),
    ({**LIVER_CODE, "region_modifier": "7771000 |Left|"}, SCHEME, "'code.region_modifier' without 'code.region'"),
    ({**LIVER_CODE, "note": 3}, SCHEME, "'code.note' is not a text"),
    ("10200004 |Liver|", SCHEME, "'code' is not a mapping"),
    (LIVER_CODE, None, "'coding_scheme' is missing"),
    (LIVER_CODE, {"designator": "SRT", "version": "1"}, "designator is not SCT"),
    (LIVER_CODE, {"designator": "SCT", "version": "x" * 17}, "over 16 characters"),
    (LIVER_CODE, {**SCHEME, "editon": "x"}, "unknown field(s) editon"),
])
def test_malformed_code_names_card_and_label(tmp_path: Path, code: object, scheme: dict | None, problem: str) -> None:
    labels = {1: {"name": "liver", "code": code}, 2: {"name": "left kidney"}}
    extra = {} if scheme is None else {"coding_scheme": scheme}
    path = write_card(tmp_path / "coded.yaml", labels=labels, **extra)
    with pytest.raises(InputError) as info:
        load_card(path)
    message = str(info.value)
    assert str(path) in message and problem in message
    if scheme is SCHEME:  # a label's code is at fault, not the card-level scheme
        assert "label 1 ('liver')" in message


def test_valid_user_code_is_read(tmp_path: Path) -> None:
    labels = {1: {"name": "liver", "code": {**LIVER_CODE, "note": "test"}}, 2: {"name": "left kidney"}}
    card = load_card(write_card(tmp_path / "coded.yaml", labels=labels, coding_scheme=SCHEME))
    assert str(card.by_id(1).coding.type) == "10200004 |Liver|" and card.by_id(1).coding.note == "test"
    assert card.by_id(2).coding is None and card.coding_scheme.version == "20240701"


# ---- adult reference ranges (volume, CT attenuation) for plausibility checks -------------------------------------
ABDOMINAL_NINE = ["liver", "spleen", "right kidney", "left kidney", "aorta", "stomach", "pancreas",
                  "inferior vena cava", "gallbladder"]


@pytest.mark.parametrize("name", ["phantom", "totalsegmentator", "btcv", "amos"])
def test_abdominal_organs_have_cited_reference_ranges(name: str) -> None:
    card = load_card(name)
    assert card.reference_sources and "ICRP" in card.reference_sources
    for organ in ABDOMINAL_NINE:
        reference = card.resolve(organ).reference
        assert reference is not None, organ
        assert 0 < reference.volume_ml[0] < reference.volume_ml[1] and reference.hu[0] < reference.hu[1], organ
    assert card.resolve("liver").reference == load_card("phantom").resolve("liver").reference
    liver = card.resolve("liver").reference
    assert liver.volume_ml[0] <= 1000 <= 2000 <= liver.volume_ml[1] and liver.hu[0] <= 60 <= liver.hu[1]


def test_reference_ranges_are_optional(tmp_path: Path) -> None:
    card = load_card(write_card(tmp_path / "plain.yaml"))
    assert card.reference_sources is None and all(c.reference is None for c in card.concepts.values())
    labels = {1: {"name": "liver", "reference": {"hu": [-20, 200]}}, 2: {"name": "left kidney"}}
    card = load_card(write_card(tmp_path / "partial.yaml", labels=labels, reference_sources="a textbook"))
    assert card.by_id(1).reference.hu == (-20.0, 200.0) and card.by_id(1).reference.volume_ml is None
    assert card.by_id(2).reference is None and card.reference_sources == "a textbook"


@pytest.mark.parametrize("reference, problem", [
    ({"volume_ml": [3000, 700]}, "'reference.volume_ml' [3000, 700] is empty or reversed"),
    ({"volume_ml": [0, 700]}, "'reference.volume_ml' starts at 0 mL"),
    ({"volume_ml": [-5, 700]}, "'reference.volume_ml' [-5, 700] leaves [0, inf]"),
    ({"volume_ml": [700]}, "'reference.volume_ml' is [700], not [low, high]"),
    ({"volume_ml": "700-3000"}, "'reference.volume_ml' is '700-3000', not [low, high]"),
    ({"hu": [-20, float("nan")]}, "'reference.hu' is [-20, nan], not [low, high] of two finite numbers"),
    ({"hu": [True, 200]}, "not [low, high] of two finite numbers"),
    ({"hu": [-2000, 200]}, "'reference.hu' [-2000, 200] leaves [-1024, 3071]"),
    ({"volume": [700, 3000]}, "'reference' has unknown field(s) volume"),
    ({}, "'reference' is not a mapping with volume_ml and/or hu"),
    ([700, 3000], "'reference' is not a mapping with volume_ml and/or hu"),
])
def test_malformed_reference_range_names_card_and_label(tmp_path: Path, reference: object, problem: str) -> None:
    labels = {1: {"name": "liver", "reference": reference}, 2: {"name": "left kidney"}}
    path = write_card(tmp_path / "ranged.yaml", labels=labels)
    with pytest.raises(InputError) as info:
        load_card(path)
    message = str(info.value)
    assert str(path) in message and "label 1 ('liver')" in message and problem in message


def test_reference_sources_must_be_text(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="'reference_sources' is not a non-empty text"):
        load_card(write_card(tmp_path / "bad.yaml", reference_sources=["ICRP"]))
