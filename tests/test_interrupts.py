"""An interrupt that lands while a module is being imported still stops a run cleanly (exit 130, summary written)."""
from __future__ import annotations

import json

import pytest

from medclipsam.inference import batch
from medclipsam.inference.interrupts import caused_by_interrupt
from medclipsam.inference.segment_request import SegmentOptions


class _InterruptedOnBinding:
    """A descriptor whose binding to a class is hit by Ctrl-C, as `functools.cached_property` was in pdb's import."""

    def __set_name__(self, owner: type, name: str) -> None:
        raise KeyboardInterrupt


def _interrupt_during_class_creation() -> BaseException:
    try:
        type("Target", (), {"details": _InterruptedOnBinding()})
    except BaseException as error:  # noqa: B036 - the point is what Python turns the interrupt into
        return error
    raise AssertionError("creating the class should have raised")


def test_an_interrupt_during_class_creation_is_recognised_whatever_python_wraps_it_in():
    error = _interrupt_during_class_creation()
    assert caused_by_interrupt(error)
    assert not caused_by_interrupt(RuntimeError("a real failure"))
    assert caused_by_interrupt(KeyboardInterrupt())


def test_run_batch_treats_a_wrapped_interrupt_as_an_interrupt(tmp_path, monkeypatch):
    def interrupted_import(*_args, **_kwargs):
        raise RuntimeError("Error calling __set_name__") from KeyboardInterrupt()

    monkeypatch.setattr(batch, "_run", interrupted_import)
    out = tmp_path / "out"
    options = SegmentOptions(inputs=[str(tmp_path / "scan.nii.gz")], prompts=["liver"], out=out)
    assert batch.run_batch(options) == 130
    assert json.loads((out / "summary.json").read_text())["interrupted"] is True


def test_run_batch_still_raises_errors_no_interrupt_caused(tmp_path, monkeypatch):
    def broken(*_args, **_kwargs):
        raise RuntimeError("a real failure")

    monkeypatch.setattr(batch, "_run", broken)
    options = SegmentOptions(inputs=[str(tmp_path / "scan.nii.gz")], prompts=["liver"], out=tmp_path / "out")
    with pytest.raises(RuntimeError, match="a real failure"):
        batch.run_batch(options)
