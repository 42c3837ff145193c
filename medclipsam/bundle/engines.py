"""MONAI engines that train medclipsam methods, so that bundle handlers (stats, TensorBoard, checkpoints) attach
to them like to any MONAI trainer.

A resumable method (CLIP-Guided SAM) trains step by step through its own trainer (cached frozen trunk, similarity
warm-up, pair steps): one engine iteration is one optimiser step. The other methods train inside a single `fit`
call: their engine has one iteration.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping, Sequence

from monai.engines import Trainer as MonaiTrainer
from monai.engines import Workflow
from torch import nn

from medclipsam.models.checkpoints import save_checkpoint
from medclipsam.training import distributed
from medclipsam.training.loop import TrainBudget
from medclipsam.training.pipeline import MODEL_DIR
from medclipsam.training.trainer import Trainer


class StepTrainer(MonaiTrainer):
    """A medclipsam `Trainer` as a MONAI engine: iteration i is optimiser step i, its output the step's loss terms.

    The Trainer's folder is resumed first, so a restarted run continues at the saved step (iterations keep their
    global numbering) and a finished one has nothing left to do.
    """

    def __init__(self, trainer: Trainer, handlers: Sequence | None = None) -> None:
        if trainer.out_dir is None:
            raise ValueError("StepTrainer needs a Trainer with an output folder (out_dir) for its checkpoints")
        self.steps = trainer
        trainer.out_dir.mkdir(parents=True, exist_ok=True)
        trainer.resume()
        total = trainer.config.total_steps
        super().__init__(device=trainer.model.device, max_epochs=1, data_loader=range(total), epoch_length=total,
                         handlers=handlers, decollate=False)
        self.state.iteration = trainer.step_done

    def _iteration(self, engine: Any, batchdata: Any) -> dict:
        """One optimiser step (similarity warm-up or pairs, by the step count)."""
        return self.steps.step()

    def run(self) -> None:
        """Train up to the configured number of steps, then leave the model in eval mode."""
        if self.steps.step_done >= self.steps.config.total_steps:
            self.logger.info(f"{self.steps.out_dir} already holds step {self.steps.step_done}: nothing to train")
            return
        super().run()
        self.steps.model.eval()

    def save(self) -> None:
        """The method's checkpoint and the resumable state (every rank calls it; rank 0 writes)."""
        self.steps.save()


class FitTrainer(MonaiTrainer):
    """A method trained by one `fit` call within `budget`, as a one-iteration MONAI engine whose output is the last
    step's loss terms (a method's progress messages go to the engine's logger)."""

    def __init__(self, method: nn.Module, labelled: Sequence[dict], unlabelled: Sequence[dict],
                 budget: TrainBudget, output_dir: str | Path, options: Mapping[str, Any],
                 handlers: Sequence | None = None) -> None:
        if distributed.world_size() > 1:
            raise ValueError(f"{method.name} trains in one process; run train.yaml without multi_gpu_train.yaml "
                             "(data-parallel training is for clip_guided_sam)")
        self.method, self.labelled, self.unlabelled, self.budget = method, list(labelled), list(unlabelled), budget
        self.output_dir, self.options = Path(output_dir), dict(options)
        super().__init__(device=method.device, max_epochs=1, data_loader=range(1), epoch_length=1,
                         handlers=handlers, decollate=False)

    def _iteration(self, engine: Any, batchdata: Any) -> dict:
        """The whole `fit`."""
        history = self.method.fit(self.labelled, self.unlabelled, self.budget, progress=self.logger.info)
        self.method.eval()
        return {"step": self.budget.steps, "phase": "fit", **(history[-1] if history else {})}

    def save(self) -> None:
        """The method's checkpoint in `output_dir/model`."""
        save_checkpoint(self.method, self.output_dir / MODEL_DIR, self.method.name, self.method.concepts,
                        self.options, self.method.frame, extra={"budget": asdict(self.budget)}, overwrite=True)


def training_engine(method: nn.Module, labelled: Sequence[dict], output_dir: str | Path, budget: TrainBudget,
                    unlabelled: Sequence[dict] = (), options: Mapping[str, Any] | None = None,
                    handlers: Sequence | None = None) -> Workflow:
    """The engine that trains `method` on slice items: a resumable method step by step through its `trainer`
    (data parallel under torchrun), any other by its `fit` within `budget`."""
    if method.resumable:
        return StepTrainer(method.trainer(labelled, budget, work_dir=Path(output_dir)), handlers)
    return FitTrainer(method, labelled, unlabelled, budget, output_dir, options or {}, handlers)
