"""The loop every baseline trains with: a budget (steps, slices per step, seed), one sampler of slices, and the
optimiser step, logging and progress around a method's own loss."""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
from torch import nn


@dataclass
class TrainBudget:
    """What every method gets for a fair comparison: the same number of steps, slices per step and seed."""

    steps: int = 200
    slices_per_step: int = 2
    seed: int = 0


class SliceSampler:
    """Endless shuffled passes over `n` slice items: each draw takes the next indices, each item once per pass."""

    def __init__(self, n: int, seed: int) -> None:
        if n < 1:
            raise ValueError("no slice items to sample from")
        self.n = n
        self.rng = random.Random(seed)
        self.queue: list[int] = []

    def draw(self, count: int) -> list[int]:
        """The next `count` indices, reshuffling a fresh pass whenever the current one runs out."""
        while len(self.queue) < count:
            fresh = list(range(self.n))
            self.rng.shuffle(fresh)
            self.queue += fresh
        chosen, self.queue = self.queue[:count], self.queue[count:]
        return chosen


def report_step(progress: Callable[[str], None] | None, name: str, step: int, steps: int,
                terms: Mapping[str, float]) -> None:
    """Send every tenth step's (and the last step's) loss terms of method `name` to `progress`."""
    if progress and (step % 10 == 0 or step == steps):
        progress(f"{name}: step {step}/{steps} " + " ".join(f"{term} {value:.4f}" for term, value in terms.items()))


StepLoss = Callable[[list[int], int], tuple[torch.Tensor, dict[str, float]]]


def run_steps(method: nn.Module, optimizer: torch.optim.Optimizer, budget: TrainBudget, items: int, loss: StepLoss,
              progress: Callable[[str], None] | None = None,
              after_step: Callable[[int], None] | None = None) -> list[dict[str, float]]:
    """`budget.steps` optimiser steps of `method` (in train mode, left in eval mode), each on
    `budget.slices_per_step` items drawn by a `SliceSampler` seeded with `budget.seed`: `loss(indices, step)` returns
    the total and the terms to log; a total without gradient (nothing to learn from in that batch) takes no step.
    Returns the logged terms per step."""
    sampler = SliceSampler(items, budget.seed)
    history: list[dict[str, float]] = []
    method.train()
    for step in range(1, budget.steps + 1):
        total, terms = loss(sampler.draw(budget.slices_per_step), step)
        if total.requires_grad:
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
        if after_step is not None:
            after_step(step)
        history.append({"total": float(total.detach()), **terms})
        report_step(progress, method.name, step, budget.steps, history[-1])
    method.eval()
    return history
