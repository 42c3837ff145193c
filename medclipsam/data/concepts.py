"""Concept cards: per-dataset label id <-> organ name <-> synonyms (+ SNOMED CT codes for DICOM SEG, + adult reference
ranges of volume and CT attenuation for plausibility checks), read from the YAML files in `data_cards/`."""
from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from medclipsam.data.card_fields import checked_mapping
from medclipsam.data.snomed import CodingScheme, SegmentCoding, coding_scheme, segment_coding
from medclipsam.errors import InputError, UnknownConceptError

try:
    from importlib.resources.abc import Traversable
except ImportError:  # Python 3.10
    from importlib.abc import Traversable

_CARD_SUFFIXES = (".yaml", ".yml")
_REQUIRED_TEXT_FIELDS = ("name", "title", "source", "licence", "modality")
_TOKEN_ALIASES = {"l": "left", "lt": "left", "r": "right", "rt": "right"}
_MAX_CLOSE = 5
REFERENCE_KEYS = ("volume_ml", "hu")
_HU_LIMITS = (-1024.0, 3071.0)  # the 12-bit range CT scanners store


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML safe loader that refuses a mapping with the same key twice (plain YAML would keep the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def normalise(word: str) -> str:
    """Lower-case `word`, treat any non-alphanumeric run as one space and spell out L/R, so
    "Left-Kidney", "left_kidney" and "L  kidney" all become "left kidney"."""
    tokens = re.sub(r"[^0-9a-z]+", " ", word.lower()).split()
    return " ".join(_TOKEN_ALIASES.get(t, t) for t in tokens)


def _similarity(query: str, key: str) -> float:
    """How alike a normalised query and a known key are (0..1): contained in it, like it as a whole, or very like
    one of its words (a word match under 0.8 counts as no match)."""
    if len(query) >= 3 and query in key:
        return 1.0
    whole = difflib.SequenceMatcher(None, query, key).ratio()
    word = max(difflib.SequenceMatcher(None, query, part).ratio() for part in key.split())
    return max(whole, word if word >= 0.8 else 0.0)


def _order_free(key: str) -> str:
    """The normalised key with its words sorted, so "kidney left" meets "left kidney"."""
    return " ".join(sorted(key.split()))


@dataclass(frozen=True)
class ReferenceRanges:
    """An organ's adult reference ranges: volume in mL and CT attenuation in HU (any contrast phase), each (low,
    high) or None; masks outside them are flagged as implausible."""

    volume_ml: tuple[float, float] | None = None
    hu: tuple[float, float] | None = None


@dataclass(frozen=True)
class Concept:
    """One segmentable structure of a dataset: its label id, canonical name, synonyms, (optional) SNOMED CT coding
    for DICOM SEG and (optional) adult reference ranges."""

    label_id: int
    name: str
    synonyms: tuple[str, ...] = ()
    coding: SegmentCoding | None = None
    reference: ReferenceRanges | None = None

    def all_names(self) -> tuple[str, ...]:
        """Canonical name first, then the synonyms."""
        return (self.name, *self.synonyms)


@dataclass
class ConceptCard:
    """A dataset's card: provenance, licence, modality, concepts by label id, splits and preprocessing notes, the
    coding scheme (SNOMED CT version) of its labels' codes and the sources of its reference ranges when it has any."""

    name: str
    title: str
    source: str
    licence: str
    modality: str
    concepts: dict[int, Concept]
    splits: Any = None
    preprocessing: Any = None
    coding_scheme: CodingScheme | None = None
    reference_sources: str | None = None
    _exact: dict[str, int] = field(init=False, repr=False, compare=False)
    _unordered: dict[str, int | None] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._exact = {}
        self._unordered = {}
        for label_id in sorted(self.concepts):
            concept = self.concepts[label_id]
            for alias in concept.all_names():
                key = normalise(alias)
                if not key:
                    raise InputError(self.name, f"label {label_id} has an empty name or synonym {alias!r}",
                                     "Give every name and synonym at least one letter or digit")
                other = self._exact.setdefault(key, label_id)
                if other != label_id:
                    raise InputError(
                        self.name,
                        f"{alias!r} (label {label_id}) and label {other} ({self.concepts[other].name!r}) "
                        f"normalise to the same word {key!r}",
                        "Remove or rename one of them in the card so each word means one concept",
                    )
                loose = _order_free(key)
                if self._unordered.get(loose, label_id) != label_id:
                    self._unordered[loose] = None  # ambiguous without word order: exact match only
                else:
                    self._unordered[loose] = label_id

    def resolve(self, word: str) -> Concept:
        """The concept that `word` names (canonical name or synonym; case, '_', '-', spacing and word order free)."""
        key = normalise(word)
        label_id = self._exact.get(key)
        if label_id is None:
            label_id = self._unordered.get(_order_free(key))
        if label_id is None:
            raise UnknownConceptError(word, self.name, self.close_names(word))
        return self.concepts[label_id]

    def close_names(self, word: str, n: int = _MAX_CLOSE) -> list[str]:
        """Up to `n` canonical names whose name or a synonym looks like `word` (for error messages)."""
        key = normalise(word)
        if not key:
            return []
        scored = sorted(((_similarity(key, k), k) for k in self._exact), key=lambda s: -s[0])
        close: list[str] = []
        for score, k in scored:
            if score < 0.6:
                break
            name = self.concepts[self._exact[k]].name
            if name not in close:
                close.append(name)
        return close[:n]

    def names(self) -> list[str]:
        """Canonical names ordered by label id."""
        return [self.concepts[i].name for i in sorted(self.concepts)]

    def by_id(self, label_id: int) -> Concept:
        """The concept with integer label `label_id`."""
        try:
            return self.concepts[int(label_id)]
        except KeyError:
            word = f"label id {label_id} (card ids run {min(self.concepts)}..{max(self.concepts)})"
            raise UnknownConceptError(word, self.name, []) from None

    def label_map(self) -> dict[int, str]:
        """Label id -> canonical name, ordered by id (background 0 is implicit and not included)."""
        return {i: self.concepts[i].name for i in sorted(self.concepts)}

    def id_map_from(self, source: "ConceptCard") -> dict[int, int]:
        """Each label id of `source` -> the id of the same concept here (matched by any of its names), or 0 when this
        card does not name it: how a dataset labelled with another card is read with this one."""
        mapping = {}
        for label_id, concept in source.concepts.items():
            mapping[label_id] = 0
            for name in concept.all_names():
                try:
                    mapping[label_id] = self.resolve(name).label_id
                    break
                except UnknownConceptError:
                    continue
        return mapping


def cards_dir() -> Traversable:
    """Folder holding the shipped cards: the installed `medclipsam.data_cards`, else the source tree's `data_cards/`."""
    try:
        return resources.files("medclipsam.data_cards")
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[2] / "data_cards"


def available_cards() -> list[str]:
    """Names of the shipped cards, sorted."""
    return sorted(p.name.rsplit(".", 1)[0] for p in cards_dir().iterdir()
                  if p.is_file() and p.name.endswith(_CARD_SUFFIXES))


def _looks_like_path(name_or_path: str | Path) -> bool:
    text = str(name_or_path)
    return isinstance(name_or_path, Path) or text.endswith(_CARD_SUFFIXES) or "/" in text or "\\" in text


def card_text(name_or_path: str | Path) -> str:
    """Raw YAML text of a card given by shipped name or by path (so datasets can carry an exact copy)."""
    if _looks_like_path(name_or_path):
        path = Path(name_or_path)
        if not path.is_file():
            raise InputError(path, "card file does not exist", "Check the path, or pass a shipped card name: "
                             + ", ".join(available_cards()))
        return path.read_text(encoding="utf-8")
    folder = cards_dir()
    for suffix in _CARD_SUFFIXES:
        entry = folder / f"{name_or_path}{suffix}"
        if entry.is_file():
            return entry.read_text(encoding="utf-8")
    raise InputError(str(name_or_path), "no such concept card",
                     "Use one of the shipped cards: " + ", ".join(available_cards()) + " (or a path to a .yaml card)")


def load_card(name_or_path: str | Path) -> ConceptCard:
    """Read and validate a card by shipped name (e.g. "btcv") or by path to a YAML file."""
    where = str(name_or_path)
    try:
        raw = yaml.load(card_text(name_or_path), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        raise InputError(where, f"card is not valid YAML: {problem}{at}",
                         "Fix the YAML (valid syntax, each key once per mapping)") from None
    return card_from_dict(raw, where)


def card_from_dict(raw: Any, where: str) -> ConceptCard:
    """Build a validated ConceptCard from parsed YAML; `where` names the source in error messages."""
    if not isinstance(raw, dict):
        raise InputError(where, "card is not a YAML mapping", "Write the card as 'field: value' lines")
    for key in _REQUIRED_TEXT_FIELDS:
        value = raw.get(key)
        if not isinstance(value, str) or not value.strip():
            raise InputError(where, f"field {key!r} is missing or not a non-empty text",
                             f"Add '{key}: ...' to the card")
    labels = raw.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise InputError(where, "field 'labels' is missing or empty",
                         "Add 'labels:' mapping integer label ids to {name: ..., synonyms: [...]}")
    concepts: dict[int, Concept] = {}
    for key, entry in labels.items():
        label_id = _label_id(key, where)
        if label_id in concepts:
            raise InputError(where, f"label id {label_id} appears twice in 'labels'", "Give each label one id")
        concepts[label_id] = _concept(label_id, entry, where)
    coded = any(c.coding is not None for c in concepts.values())
    scheme = coding_scheme(raw.get("coding_scheme"), where) if coded or "coding_scheme" in raw else None
    sources = raw.get("reference_sources")
    if sources is not None and (not isinstance(sources, str) or not sources.strip()):
        raise InputError(where, "field 'reference_sources' is not a non-empty text",
                         "Write where the reference ranges come from as one text (publications, editions)")
    try:
        return ConceptCard(
            name=raw["name"].strip(), title=raw["title"].strip(), source=raw["source"].strip(),
            licence=raw["licence"].strip(), modality=raw["modality"].strip(), concepts=concepts,
            splits=raw.get("splits"), preprocessing=raw.get("preprocessing"), coding_scheme=scheme,
            reference_sources=sources.strip() if sources else None,
        )
    except InputError as err:  # name the file, not just the card
        raise InputError(where, err.problem, err.fix) from None


def _label_id(key: Any, where: str) -> int:
    if isinstance(key, bool) or not (isinstance(key, int) or (isinstance(key, str) and key.strip().isdigit())):
        raise InputError(where, f"field 'labels' has key {key!r}, not an integer label id",
                         "Use positive integers as label ids")
    label_id = int(key)
    if label_id <= 0:
        raise InputError(where, f"field 'labels' has id {label_id}; background 0 is implicit",
                         "Use positive integers as label ids and leave out background")
    return label_id


def _concept(label_id: int, entry: Any, where: str) -> Concept:
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"].strip():
        raise InputError(where, f"field 'labels.{label_id}.name' is missing or not a text",
                         f"Write 'name: <organ name>' under label {label_id}")
    synonyms = entry.get("synonyms") or []
    if not isinstance(synonyms, list) or not all(isinstance(s, str) for s in synonyms):
        raise InputError(where, f"field 'labels.{label_id}.synonyms' is not a list of texts",
                         "Write synonyms as a YAML list, e.g. [IVC, vena cava]")
    name = entry["name"].strip()
    coding = None if "code" not in entry else segment_coding(entry["code"], where, f"{label_id} ({name!r})")
    reference = None if "reference" not in entry else _reference(entry["reference"], where, f"{label_id} ({name!r})")
    return Concept(label_id, name, tuple(s.strip() for s in synonyms), coding, reference)


def _reference(raw: Any, where: str, label: str) -> ReferenceRanges:
    """Parse a label's `reference:` mapping (volume_ml and/or hu, each [low, high]); errors name card and label."""
    checked_mapping(raw, where, label, "reference", REFERENCE_KEYS,
                    "Write e.g. 'reference: {volume_ml: [700, 3000], hu: [-10, 200]}'")
    volume = _range(raw.get("volume_ml"), "volume_ml", (0.0, math.inf), where, label)
    if volume is not None and volume[0] <= 0:
        raise InputError(where, f"label {label}: 'reference.volume_ml' starts at {volume[0]:g} mL",
                         "Give a positive lower volume, e.g. [700, 3000]")
    return ReferenceRanges(volume, _range(raw.get("hu"), "hu", _HU_LIMITS, where, label))


def _range(raw: Any, key: str, limits: tuple[float, float], where: str, label: str) -> tuple[float, float] | None:
    """[low, high] of finite numbers within `limits`, low < high (None when the field is absent)."""
    if raw is None:
        return None
    numbers = isinstance(raw, list) and len(raw) == 2 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in raw)
    if not numbers:
        raise InputError(where, f"label {label}: 'reference.{key}' is {raw!r}, not [low, high] of two finite numbers",
                         f"Write '{key}: [low, high]', e.g. [700, 3000]")
    low, high = float(raw[0]), float(raw[1])
    if not low < high:
        raise InputError(where, f"label {label}: 'reference.{key}' [{low:g}, {high:g}] is empty or reversed",
                         "Write the lower bound first, below the upper bound")
    if low < limits[0] or high > limits[1]:
        raise InputError(where, f"label {label}: 'reference.{key}' [{low:g}, {high:g}] leaves "
                         f"[{limits[0]:g}, {limits[1]:g}]", f"Keep {key} within [{limits[0]:g}, {limits[1]:g}]")
    return low, high
