"""What `medclipsam segment` was asked (`SegmentOptions`) and the checks that need neither the model nor a scan:
numbers, the --model path, organ names against the concept card, --box and --point, --output-type against the
card's codes. Kept free of heavy imports so that these mistakes are reported at once."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from medclipsam.data.concepts import ConceptCard, load_card, normalise
from medclipsam.errors import InputError, UnknownConceptError
from medclipsam.inference.batch_summary import BatchSummary, Failure
from medclipsam.inference.output_folder import MASK_FILE
from medclipsam.inference.prompt_args import COORDINATE_SPACES, ManualPrompt, parse_manual_prompt

_LISTED_NAMES = 12  # organ names listed when a prompt matches none (a card may hold a hundred)
OUTPUT_TYPES = ("nifti", "dicom_seg", "both")
SEG_FILE = "segmentation.dcm"


@dataclass
class SegmentOptions:
    """What `medclipsam segment` was asked to do (the CLI arguments, parsed)."""

    inputs: Sequence[str]
    prompts: Sequence[str]
    out: str | Path
    model: str | None = None
    card: str = "phantom"
    boxes: Sequence[str] = ()
    points: Sequence[str] = ()
    coords: str = "voxel"
    modality: str | None = None  # None: the model's own (saved with it)
    window: str | None = None
    device: str = "auto"
    batch_size: int | None = None  # None: the predictor's default for the device
    cleanup: bool = True
    amp: bool = True
    runtime: str = "auto"  # the slice encoder: auto (OpenVINO on a CPU when installed), torch or openvino
    test_time_augmentation: bool = False  # text-only masks averaged over the predictor's TEST_TIME_VIEWS
    slice_gate: bool = True  # the model's slice gate drops invented slabs of text-only masks (if it has one)
    organ_offsets: bool = True  # each organ's own threshold for text-only masks (if the model has organ offsets)
    preview: bool = False
    output_type: str = "nifti"  # one of OUTPUT_TYPES
    statistics: bool = False
    overwrite: bool = False
    quiet: bool = False

    @property
    def writes_nifti(self) -> bool:
        return self.output_type in ("nifti", "both")

    @property
    def writes_seg(self) -> bool:
        return self.output_type in ("dicom_seg", "both")

    @property
    def result_file(self) -> str:
        """The file a scan's folder is printed with: the label map, or the SEG when it is the only output."""
        return MASK_FILE if self.writes_nifti else SEG_FILE


@dataclass(frozen=True)
class Request:
    """The known prompts and manual prompts of a batch, resolved once."""

    card: ConceptCard
    concepts: dict[str, int]  # canonical name -> card label id, in prompt order
    prompt_words: dict[str, str]  # canonical name -> the word typed
    manual: list[ManualPrompt]
    concept_of: dict[str, str]  # manual prompt word -> canonical name


def bars_off(options: SegmentOptions) -> bool:
    """Progress bars only on a terminal (in a log file they would be noise) and never when quiet."""
    return options.quiet or not sys.stderr.isatty()


def _unknown(word: str, error: UnknownConceptError, card: ConceptCard) -> str:
    """Why a prompt matches no organ, with close names or, when none is close, the card's names."""
    if error.close:
        return str(error)
    names = card.names()
    listed = ", ".join(repr(n) for n in names[:_LISTED_NAMES])
    more = f" and {len(names) - _LISTED_NAMES} more" if len(names) > _LISTED_NAMES else ""
    problem = "is empty" if not word.strip() else f"names no organ of card {card.name!r}"
    return f"{problem}; its organs are {listed}{more} (synonyms are accepted; --card picks another card)"


def resolve_prompts(words: Sequence[str], card: ConceptCard) -> tuple[dict[str, int], dict[str, str], list[Failure]]:
    """Known prompts as canonical name -> label id and -> the word typed (first wins), and one failure per
    unknown word (its message lists close names, or the card's names when none is close)."""
    concepts: dict[str, int] = {}
    typed: dict[str, str] = {}
    failures = []
    for word in words:
        try:
            concept = card.resolve(word)
        except UnknownConceptError as error:
            failures.append(Failure(f"--prompt {word!r}", _unknown(word, error, card)))
            continue
        concepts.setdefault(concept.name, concept.label_id)
        typed.setdefault(concept.name, word)
    return concepts, typed, failures


def _manual_concepts(manual: Sequence[ManualPrompt], words: Sequence[str], card: ConceptCard,
                     concepts: dict[str, int]) -> dict[str, str]:
    """Manual prompt word -> canonical concept (prompts of unknown --prompt words are dropped); checks that each
    concept has at most one box or else some points (concepts with neither are segmented by name)."""
    def known(word: str) -> str | None:
        try:
            return card.resolve(word).name
        except UnknownConceptError:
            return None

    unknown_words = {normalise(w) for w in words if known(w) is None}
    concept_of: dict[str, str] = {}
    for prompt in manual:
        concept = known(prompt.word)
        if concept not in concepts:
            if normalise(prompt.word) in unknown_words:
                continue  # its --prompt is already reported as unknown
            raise InputError(None, f"--{prompt.kind} {prompt.text!r} names {prompt.word!r}, which no --prompt asks for",
                             f"Name one of the prompts: {', '.join(repr(w) for w in words)}")
        concept_of[prompt.word] = concept
    kept = [p for p in manual if p.word in concept_of]
    for concept in concepts:
        kinds = [p.kind for p in kept if concept_of[p.word] == concept]
        if "box" in kinds and len(kinds) > 1:
            raise InputError(None, f"{concept!r} has {kinds.count('box')} --box and {kinds.count('point')} --point",
                             "Give one --box, or one or more --point, per organ")
    return concept_of


def _check_model_path(model: str) -> None:
    """A --model that is a path must be an existing folder (a bare name may name a method: the model checks it)."""
    fix = "Pass the model/ folder that `medclipsam train` wrote, or leave --model out to use the shipped model"
    path = Path(model)
    if path.exists() and not path.is_dir():
        raise InputError(path, "--model is a file; it takes a checkpoint folder", fix)
    if not path.exists() and (len(path.parts) > 1 or model.startswith(".")):
        raise InputError(path, "--model folder does not exist", fix)


def _check_codes(options: SegmentOptions, card: ConceptCard, concepts: dict[str, int]) -> None:
    """--output-type dicom_seg / both: every requested organ needs a SNOMED CT code in the card (a SEG segment is
    coded), checked before any scan is segmented."""
    if not options.writes_seg:
        return
    uncoded = [name for name in concepts if card.resolve(name).coding is None]
    if uncoded or card.coding_scheme is None:
        missing = ", ".join(repr(n) for n in uncoded) if uncoded else "its labels (no coding_scheme)"
        raise InputError(None, f"--output-type {options.output_type}: card {card.name!r} has no SNOMED CT code for "
                         f"{missing}, and every DICOM SEG segment must be coded",
                         "Add 'code:' entries and a card-level 'coding_scheme' to the card (see data_cards/README.md), "
                         "or use --output-type nifti")


def check_request(options: SegmentOptions, summary: BatchSummary) -> Request | None:
    """Check the arguments that need no model and no scan (InputError on the first wrong one); unknown prompts are
    recorded in `summary` as failures. None when no prompt names a known organ."""
    if options.batch_size is not None and options.batch_size < 1:
        raise InputError(None, f"--batch-size {options.batch_size} must be at least 1", "Use e.g. --batch-size 4")
    if options.output_type not in OUTPUT_TYPES:
        raise InputError(None, f"--output-type {options.output_type!r} is not an output type",
                         f"Use one of: {', '.join(OUTPUT_TYPES)}")
    if options.coords not in COORDINATE_SPACES:
        raise InputError(None, f"--coords {options.coords!r} is not a coordinate space",
                         f"Use one of: {', '.join(COORDINATE_SPACES)}")
    if options.model is not None:
        _check_model_path(options.model)
    card = load_card(options.card)
    concepts, typed, unknown = resolve_prompts(options.prompts, card)
    for failure in unknown:
        summary.fail(failure.what, failure.reason)
    manual = [parse_manual_prompt(t, "box", options.prompts) for t in options.boxes]
    manual += [parse_manual_prompt(t, "point", options.prompts) for t in options.points]
    if not concepts:
        return None
    concept_of = _manual_concepts(manual, options.prompts, card, concepts)
    _check_codes(options, card, concepts)
    return Request(card, concepts, typed, [p for p in manual if p.word in concept_of], concept_of)
