"""Atomic writes: the whole file or the old one, never a half-written one or a stray temp file, and the permissions
a plain write gives (temp files start private: results would otherwise be unreadable to colleagues)."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from medclipsam.atomic import atomic_write
from medclipsam.eval.metrics import write_table


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_write_gives_the_umask_permissions_of_a_plain_write(tmp_path: Path, umask_022) -> None:
    target = tmp_path / "report.json"
    atomic_write(target, lambda temp: Path(temp).write_text("{}", encoding="utf-8"))
    assert target.read_text(encoding="utf-8") == "{}"
    assert _mode(target) == 0o644
    write_table([{"case": "a", "dice": 0.5}], tmp_path / "metrics.csv")
    assert _mode(tmp_path / "metrics.csv") == 0o644


def test_failed_atomic_write_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "table.csv"
    target.write_text("old", encoding="utf-8")

    def fail_half_way(temp: str) -> None:
        Path(temp).write_text("half", encoding="utf-8")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, fail_half_way)
    assert target.read_text(encoding="utf-8") == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["table.csv"]
