"""Mean teacher (Tarvainen & Valpola 2017), 2D, after SSL4MIS's `train_mean_teacher_2D.py`: the semi-supervised
UNet baseline.

Student: the supervised UNet, trained with DiceCE on labelled slices plus a consistency loss, the mean squared
difference between its softmax and the teacher's on unlabelled slices (the teacher sees them with clipped Gaussian
noise added, as in SSL4MIS). Teacher: an exponential moving average of the student's weights. The consistency weight
ramps up as `weight * exp(-5 (1 - t)^2)`, t the fraction of the ramp done, so early, noisy teacher targets count
little.

Two choices differ from SSL4MIS's defaults, both measured on CT phantoms (2 labelled + 6 unlabelled, 1000 steps,
3 seeds; `benchmarks/mean_teacher_vs_supervised.py`): with SSL4MIS's plain consistency (weight 0.1 or 1) the student
did not beat the supervised UNet (0.649 vs 0.682 mean Dice at weight 1). So (1) the student sees each unlabelled
slice under a random similarity transform and is compared with the teacher's prediction warped the same way
(`student_warp`; transformation-consistent mean teacher, Li et al., TNNLS 2020), and (2) predictions come from the
teacher (`predict_with`), the averaged weights the method is named after. Defaults: weight 1.0, warp 0.3.

The EMA decay follows the budget unless set (`ema_decay`): SSL4MIS's fixed 0.99 averages over the last ~100 steps,
which at a short budget is a teacher still far behind its student (200 steps of 2 slices, 3 seeds: teacher 0.107
mean Dice vs supervised 0.375). `budget_ema_decay` averages over the last ~5% of the steps instead (0.9 at 200
steps: 0.416), reaching 0.99 from 2000 steps on.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medclipsam.methods.unet import DEFAULT_CHANNELS, SupervisedUNet, grey_input
from medclipsam.training.loop import SliceSampler, TrainBudget, run_steps

PREDICTORS = ("student", "teacher")
MAX_EMA_DECAY = 0.99  # SSL4MIS's decay, the longest horizon the budget rule uses
EMA_HORIZON = 0.05  # fraction of the training steps the budget rule's teacher averages over


def budget_ema_decay(steps: int) -> float:
    """EMA decay whose averaging horizon (1 / (1 - decay) steps) is EMA_HORIZON of `steps`, capped at MAX_EMA_DECAY."""
    return min(MAX_EMA_DECAY, max(0.0, 1.0 - 1.0 / (EMA_HORIZON * steps)))


def sigmoid_rampup(step: int, length: int) -> float:
    """exp(-5 (1 - t)^2) with t = step / length clipped to [0, 1]; 1 when there is no ramp (length 0)."""
    if length <= 0:
        return 1.0
    t = min(max(step / length, 0.0), 1.0)
    return float(math.exp(-5.0 * (1.0 - t) ** 2))


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """teacher ← decay · teacher + (1 - decay) · student, parameter by parameter."""
    for mean, current in zip(teacher.parameters(), student.parameters()):
        mean.mul_(decay).add_(current.detach(), alpha=1.0 - decay)


def random_warp(count: int, size: int, strength: float, generator: torch.Generator,
                device: torch.device) -> torch.Tensor | None:
    """Sampling grids of `count` random similarity transforms (rotation ± 30°·strength, scale 1 ± strength, shift
    ± strength of the half-width), or None when `strength` is 0."""
    if strength <= 0:
        return None
    turn, zoom, dx, dy = (torch.rand(4, count, generator=generator, device=device) * 2 - 1) * strength
    angle, scale = turn * math.pi / 6, 1 + zoom
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.stack([torch.stack([cos, -sin, dx], 1), torch.stack([sin, cos, dy], 1)], 1)
    return F.affine_grid(theta, [count, 1, size, size], align_corners=False)


def warp(images: torch.Tensor, grid: torch.Tensor | None) -> torch.Tensor:
    """`images` resampled (bilinear, zeros outside) on `grid`; unchanged when there is no grid."""
    return images if grid is None else F.grid_sample(images, grid, align_corners=False)


class MeanTeacher(SupervisedUNet):
    """A supervised UNet student regularised towards an EMA teacher's predictions on unlabelled slices."""

    name = "mean_teacher"
    settings = ("text",)

    def __init__(self, concepts: Sequence[str], channels: Sequence[int] = DEFAULT_CHANNELS, num_res_units: int = 2,
                 internal_size: int = 128, image_size: int = 256, lr: float = 1e-2, weight_decay: float = 1e-4,
                 ema_decay: float | None = None, consistency: float = 1.0, rampup_steps: int | None = None,
                 noise_sd: float = 0.1, noise_clip: float = 0.2, unlabelled_per_step: int | None = None,
                 predict_with: str = "teacher", student_warp: float = 0.3) -> None:
        super().__init__(concepts, channels, num_res_units, internal_size, image_size, lr, weight_decay)
        if ema_decay is not None and not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must lie in [0, 1) or be None (follow the budget), got {ema_decay!r}")
        if predict_with not in PREDICTORS:
            raise ValueError(f"predict_with must be one of {PREDICTORS}, got {predict_with!r}")
        self.ema_decay = None if ema_decay is None else float(ema_decay)
        self.consistency = float(consistency)
        self.rampup_steps = rampup_steps
        self.noise_sd = float(noise_sd)
        self.noise_clip = float(noise_clip)
        self.unlabelled_per_step = unlabelled_per_step
        self.predict_with = predict_with
        self.student_warp = float(student_warp)
        self.teacher = copy.deepcopy(self.net).requires_grad_(False)

    def prediction_net(self) -> nn.Module:
        """The student or the teacher, as `predict_with` says."""
        return self.teacher if self.predict_with == "teacher" else self.net

    def fit(self, labelled: Sequence[dict], unlabelled: Sequence[dict], budget: TrainBudget,
            progress: Callable[[str], None] | None = None, work_dir: Path | None = None) -> list[dict[str, float]]:
        """Train from seeded weights on labelled and unlabelled slices each step (unlabelled masks are never read)."""
        if not unlabelled:
            raise ValueError(f"{self.name} needs unlabelled slices; without them use supervised_unet")
        optimizer = self.start(budget.seed)
        self.teacher.load_state_dict(self.net.state_dict())
        unlabelled_sampler = SliceSampler(len(unlabelled), budget.seed + 1)
        noise = torch.Generator(device=self.device).manual_seed(budget.seed)
        n_unlabelled = budget.slices_per_step if self.unlabelled_per_step is None else self.unlabelled_per_step
        ramp = budget.steps if self.rampup_steps is None else int(self.rampup_steps)
        decay = budget_ema_decay(budget.steps) if self.ema_decay is None else self.ema_decay

        def loss(indices: list[int], step: int) -> tuple[torch.Tensor, dict[str, float]]:
            images, targets = self.labelled_batch([labelled[i] for i in indices])
            raw = torch.stack([unlabelled[i]["image"] for i in unlabelled_sampler.draw(n_unlabelled)])
            plain = grey_input(raw.to(self.device), self.internal_size)
            grid = random_warp(len(plain), plain.shape[-1], self.student_warp, noise, self.device)
            logits = self.net(torch.cat([images, warp(plain, grid)]))
            supervised = self.supervised_loss(logits[: len(images)], targets)
            jitter = torch.randn(plain.shape, generator=noise, device=self.device) * self.noise_sd
            with torch.no_grad():
                teacher_probs = torch.softmax(self.teacher(plain + jitter.clamp(-self.noise_clip, self.noise_clip)), 1)
                inside = warp(torch.ones_like(plain), grid) > 0.999
                teacher_probs = warp(teacher_probs, grid)
            squared = (torch.softmax(logits[len(images):], dim=1) - teacher_probs) ** 2
            consistency = (squared * inside).sum() / (inside.sum() * squared.shape[1]).clamp(min=1)
            weight = self.consistency * sigmoid_rampup(step, ramp)
            return supervised + weight * consistency, {
                "supervised": float(supervised.detach()), "consistency": float(consistency.detach()),
                "consistency_weight": weight}

        def update_teacher(step: int) -> None:
            ema_update(self.teacher, self.net, min(1.0 - 1.0 / (step + 1), decay))

        return run_steps(self, optimizer, budget, len(labelled), loss, progress, after_step=update_teacher)
