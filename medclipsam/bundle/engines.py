"""MONAI engines that train medclipsam methods, so that bundle handlers (stats, TensorBoard, checkpoints) attach
to them like to any MONAI trainer.

CLIP-Guided SAM trains step by step through our `Trainer` (cached frozen trunk, similarity warm-up, pair steps):
one engine iteration is one optimiser step. The other registry methods train inside a single `fit` call: their
engine has one iteration.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping, Sequence

from monai.engines import Trainer as MonaiTrainer
from monai.engines import Workflow

from medclipsam.methods.base import SegmentationMethod, TrainBudget
from medclipsam.methods.checkpoints import save_method
from medclipsam.methods.clip_guided_sam import CLIPGuidedSAMMethod
from medclipsam.training import distributed
from medclipsam.training.trainer import MODEL_DIR, TrainConfig, Trainer


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
        """Adapter checkpoint and resumable state (every rank calls it; rank 0 writes)."""
        self.steps.save()


class FitTrainer(MonaiTrainer):
    """A registry method trained by one `fit` call within `budget`, as a one-iteration MONAI engine whose output is
    the last step's loss terms (a method's progress messages go to the engine's logger)."""

    def __init__(self, method: SegmentationMethod, labelled: Sequence[dict], unlabelled: Sequence[dict],
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
        """The whole method as a method checkpoint in `output_dir/model`."""
        save_method(self.method, self.output_dir / MODEL_DIR, self.options, extra={"budget": asdict(self.budget)},
                    overwrite=True)


def training_engine(method: SegmentationMethod, labelled: Sequence[dict], output_dir: str | Path,
                    config: TrainConfig, budget: TrainBudget, unlabelled: Sequence[dict] = (),
                    options: Mapping[str, Any] | None = None, handlers: Sequence | None = None) -> Workflow:
    """The engine that trains `method` on slice items: CLIP-Guided SAM step by step with `config` (resumable, data
    parallel under torchrun), any other registry method by its `fit` within `budget`."""
    if isinstance(method, CLIPGuidedSAMMethod):
        return StepTrainer(Trainer(method.model, labelled, config, out_dir=output_dir), handlers)
    return FitTrainer(method, labelled, unlabelled, budget, output_dir, options or {}, handlers)
