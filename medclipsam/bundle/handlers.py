"""Ignite handlers for the training engines: our checkpoint format and the per-step CSV log.

MONAI's `CheckpointSaver` writes whole `.pt` state dicts; ours are adapter-only safetensors with the Trainer's
resumable state, so checkpointing goes through the engine's own `save`.
"""
from __future__ import annotations

from pathlib import Path

from ignite.engine import Engine, Events

from medclipsam.training.run_log import CsvLog


class TrainingCheckpoint:
    """Calls the engine's `save()` every `every` iterations (0: never) and when training completes.

    Attach it on every rank: under torch.distributed the ranks' random states are gathered and rank 0 writes.
    """

    def __init__(self, every: int = 0) -> None:
        if every < 0:
            raise ValueError(f"checkpoint every {every} iterations: use 0 (only at the end) or a positive count")
        self.every = int(every)

    def attach(self, engine: Engine) -> None:
        """Register the saves on `engine` (a `StepTrainer` or `FitTrainer`)."""
        if self.every:
            engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.every), self._save)
        engine.add_event_handler(Events.COMPLETED, self._save)

    @staticmethod
    def _save(engine: Engine) -> None:
        engine.save()


class StepCsvLog:
    """Appends each iteration's output (step, phase, loss terms) to a CSV file; rows after the step a run resumes
    from are dropped first, so the file always matches the checkpoint's history. Attach on rank 0 only."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.log: CsvLog | None = None

    def attach(self, engine: Engine) -> None:
        """Open the log when the run starts and write a row per completed iteration."""
        engine.add_event_handler(Events.STARTED, self._open)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._write)

    def _open(self, engine: Engine) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.log = CsvLog(self.path, keep_steps_up_to=engine.state.iteration)

    def _write(self, engine: Engine) -> None:
        self.log.write(engine.state.output)
