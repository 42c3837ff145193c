"""SNOMED CT codes of concept-card labels, for DICOM SEG: "SCTID |meaning|" strings read, checked and validated.

A code is written as in SNOMED's compositional grammar, e.g. ``10200004 |Liver|``. An identifier must be all
digits (6-18), have a concept partition ("00" or "10") and a valid Verhoeff check digit, so a mistyped code is
refused rather than written into a SEG. Categories must be from DICOM PS3.16 CID 7150.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from medclipsam.data.card_fields import checked_mapping
from medclipsam.errors import InputError

SCHEME_DESIGNATOR = "SCT"
MAX_VERSION_CHARS = 16  # Coding Scheme Version (0008,0103) is a DICOM SH value
# DICOM PS3.16 CID 7150 "Segmentation Property Category"
SEGMENTATION_CATEGORIES = {
    "85756007": "Tissue",
    "91723000": "Anatomical Structure",
    "260787004": "Physical object",
    "49755003": "Morphologically Abnormal Structure",
    "246464006": "Function",
    "309825002": "Spatial and Relational Concept",
    "91720002": "Body Substance",
    "105590001": "Substance",
}
SCHEME_KEYS = ("designator", "version", "sources")
CODE_KEYS = ("category", "type", "type_modifier", "region", "region_modifier", "note")
_CODE_TEXT = re.compile(r"^\s*(\d+)\s*\|([^|]+)\|\s*$")
_CONCEPT_PARTITIONS = ("00", "10")
_FORMAT = "'<SCTID> |<meaning>|', e.g. '10200004 |Liver|'"

# Verhoeff's dihedral-group tables (multiplication, position permutation), as SNOMED CT specifies for check digits.
_D5_MULTIPLY = [
    [0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 4, 0, 6, 7, 8, 9, 5], [2, 3, 4, 0, 1, 7, 8, 9, 5, 6],
    [3, 4, 0, 1, 2, 8, 9, 5, 6, 7], [4, 0, 1, 2, 3, 9, 5, 6, 7, 8], [5, 9, 8, 7, 6, 0, 4, 3, 2, 1],
    [6, 5, 9, 8, 7, 1, 0, 4, 3, 2], [7, 6, 5, 9, 8, 2, 1, 0, 4, 3], [8, 7, 6, 5, 9, 3, 2, 1, 0, 4],
    [9, 8, 7, 6, 5, 4, 3, 2, 1, 0],
]
_D5_PERMUTE = [
    [0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 5, 7, 6, 2, 8, 3, 0, 9, 4], [5, 8, 0, 3, 7, 9, 6, 1, 4, 2],
    [8, 9, 1, 6, 0, 4, 3, 5, 2, 7], [9, 4, 5, 3, 1, 2, 6, 8, 7, 0], [4, 2, 8, 6, 5, 7, 3, 9, 0, 1],
    [2, 7, 9, 3, 8, 0, 6, 4, 1, 5], [7, 0, 4, 6, 9, 1, 3, 2, 5, 8],
]


def verhoeff_valid(digits: str) -> bool:
    """True if the last digit of `digits` is the Verhoeff check digit of the rest (SNOMED CT identifiers)."""
    check = 0
    for position, digit in enumerate(reversed(digits)):
        check = _D5_MULTIPLY[check][_D5_PERMUTE[position % 8][int(digit)]]
    return check == 0


@dataclass(frozen=True)
class Code:
    """One SNOMED CT concept: its identifier and the meaning shown to readers."""

    value: str
    meaning: str

    def __str__(self) -> str:
        return f"{self.value} |{self.meaning}|"


@dataclass(frozen=True)
class SegmentCoding:
    """How a DICOM SEG segment is coded: property category and type (+ type modifier such as laterality), optional
    anatomic region (+ modifier) for lesions, and a note where the code only approximates the label."""

    category: Code
    type: Code
    type_modifier: Code | None = None
    region: Code | None = None
    region_modifier: Code | None = None
    note: str | None = None


@dataclass(frozen=True)
class CodingScheme:
    """A card's coding scheme: designator (always "SCT") and the version its codes are stated against."""

    designator: str
    version: str


def _code(text: Any, field: str, where: str, label: str) -> Code:
    match = _CODE_TEXT.match(text) if isinstance(text, str) else None
    if match is None:
        raise InputError(where, f"label {label}: {field} {text!r} is not written as {_FORMAT}",
                         "Write the SNOMED CT identifier, a space and the meaning between bars")
    value, meaning = match.group(1), match.group(2).strip()
    if not 6 <= len(value) <= 18 or value[-3:-1] not in _CONCEPT_PARTITIONS or not verhoeff_valid(value):
        raise InputError(where, f"label {label}: {field} {value} is not a valid SNOMED CT concept identifier "
                         "(6-18 digits, concept partition 00/10, Verhoeff check digit)",
                         "Copy the identifier again from SNOMED CT or DICOM PS3.16; a digit is likely wrong")
    if not meaning:
        raise InputError(where, f"label {label}: {field} {value} has an empty meaning", f"Write it as {_FORMAT}")
    return Code(value, meaning)


def segment_coding(raw: Any, where: str, label: str) -> SegmentCoding:
    """Parse and validate a label's `code:` mapping; `where` and `label` name the card and label in errors."""
    checked_mapping(raw, where, label, "code", CODE_KEYS, "Write 'code:' with 'category:' and 'type:' lines under it")
    for key in ("category", "type"):
        if key not in raw:
            raise InputError(where, f"label {label}: 'code.{key}' is missing", f"Add '{key}: {_FORMAT}'")
    codes = {key: _code(raw[key], f"code.{key}", where, label) for key in CODE_KEYS[:-1] if raw.get(key) is not None}
    category = codes["category"]
    expected = SEGMENTATION_CATEGORIES.get(category.value)
    if expected is None or expected.lower() != category.meaning.lower():
        allowed = "; ".join(f"{v} |{m}|" for v, m in SEGMENTATION_CATEGORIES.items())
        raise InputError(where, f"label {label}: code.category {category} is not a DICOM segmentation property "
                         "category (CID 7150)", f"Use one of: {allowed}")
    if "region_modifier" in codes and "region" not in codes:
        raise InputError(where, f"label {label}: 'code.region_modifier' without 'code.region'",
                         "Add the anatomic region the modifier qualifies, or remove the modifier")
    note = raw.get("note")
    if note is not None and (not isinstance(note, str) or not note.strip()):
        raise InputError(where, f"label {label}: 'code.note' is not a text", "Write the note as one line of text")
    return SegmentCoding(**codes, note=note.strip() if note else None)


def coding_scheme(raw: Any, where: str) -> CodingScheme:
    """Parse the card-level `coding_scheme:` mapping: designator SCT, a version of at most 16 characters and an
    optional `sources` text saying where the codes were checked."""
    fix = f"Write 'coding_scheme: {{designator: SCT, version: <SNOMED CT edition, up to {MAX_VERSION_CHARS} chars>}}'"
    if isinstance(raw, dict) and set(map(str, raw)) - set(SCHEME_KEYS):
        unknown = ", ".join(sorted(set(map(str, raw)) - set(SCHEME_KEYS)))
        raise InputError(where, f"field 'coding_scheme' has unknown field(s) {unknown}",
                         f"Use only: {', '.join(SCHEME_KEYS)}")
    if not isinstance(raw, dict) or raw.get("designator") != SCHEME_DESIGNATOR:
        raise InputError(where, "field 'coding_scheme' is missing or its designator is not SCT "
                         "(the cards' codes are SNOMED CT)", fix)
    version = raw.get("version")
    if not isinstance(version, str) or not version.strip() or len(version.strip()) > MAX_VERSION_CHARS:
        raise InputError(where, f"field 'coding_scheme.version' is missing, empty or over {MAX_VERSION_CHARS} "
                         "characters", fix)
    return CodingScheme(SCHEME_DESIGNATOR, version.strip())
