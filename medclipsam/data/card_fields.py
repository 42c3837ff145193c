"""Shape checks shared by a concept card's per-label mappings (`code:`, `reference:`): errors name card and label."""
from __future__ import annotations

from typing import Any, Sequence

from medclipsam.errors import InputError


def checked_mapping(raw: Any, where: str, label: str, field: str, keys: Sequence[str], how: str) -> dict:
    """`raw` when it is a non-empty mapping of only `keys`; otherwise an InputError saying `how` to write it."""
    if not isinstance(raw, dict) or not raw:
        raise InputError(where, f"label {label}: '{field}' is not a mapping with {' and/or '.join(keys)}", how)
    unknown = sorted(set(map(str, raw)) - set(keys))
    if unknown:
        raise InputError(where, f"label {label}: '{field}' has unknown field(s) {', '.join(unknown)}",
                         f"Use only: {', '.join(keys)}")
    return raw
