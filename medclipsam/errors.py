"""Project errors: each says which file or name is at fault, what is wrong and what to do."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence


class MedClipSamError(Exception):
    """Base class for every error this package raises on purpose."""


class InputError(MedClipSamError, ValueError):
    """A scan, label, datalist or other input file cannot be used as given."""

    def __init__(self, path: str | Path | None, problem: str, fix: str) -> None:
        self.path = None if path is None else str(path)
        self.problem = problem
        self.fix = fix
        where = f"{self.path}: " if self.path else ""
        super().__init__(f"{where}{problem}. {fix}")


class OutputExistsError(MedClipSamError, FileExistsError):
    """Writing would overwrite an input or an existing output."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        super().__init__(f"{path}: {reason}")


class UnknownConceptError(MedClipSamError, KeyError):
    """A concept (organ) name is not in the card; lists the closest known names."""

    def __init__(self, word: str, card: str, close: Sequence[str]) -> None:
        self.word = word
        self.card = card
        self.close = list(close)
        hint = f" Did you mean: {', '.join(repr(c) for c in self.close)}?" if self.close else ""
        super().__init__(f"unknown concept {word!r} for card {card!r}.{hint}")

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class WeightsError(MedClipSamError, RuntimeError):
    """A checkpoint or pretrained model is missing, of the wrong architecture or has mismatched keys."""

    def __init__(self, source: str | Path, problem: str, fix: str) -> None:
        self.source = str(source)
        super().__init__(f"{source}: {problem}. {fix}")
