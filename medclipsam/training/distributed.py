"""Data-parallel training over `torch.distributed` ranks (torchrun; gloo on CPU, nccl on GPU) for the Trainer.

Our Trainer calls the model's parts (encoder trunk, decoder, similarity head) rather than one `forward`, so
`DistributedDataParallel` cannot hook it; instead replicas start from rank 0's trainable weights and average their
gradients before every optimiser step. Every helper is a no-op in a single process.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.distributed as dist
from torch import nn


def world_size() -> int:
    """Number of ranks (1 when torch.distributed is not initialised)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank (0 when torch.distributed is not initialised)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main_process() -> bool:
    """True on rank 0, the one process that writes logs and checkpoints."""
    return rank() == 0


def _trainable(parameters: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    return [p for p in {id(p): p for p in parameters}.values() if p.requires_grad]


@torch.no_grad()
def broadcast_trainable(module: nn.Module) -> None:
    """Copy rank 0's trainable parameters to every rank, so that all replicas start from the same weights."""
    if world_size() == 1:
        return
    for param in _trainable(module.parameters()):
        dist.broadcast(param.data, src=0)


@torch.no_grad()
def average_gradients(parameters: Iterable[nn.Parameter]) -> None:
    """Average the gradients of the trainable parameters over all ranks (a missing gradient counts as zero).

    A parameter that no rank touched in this step keeps `grad=None`, so the optimiser skips it exactly as it would
    in a single process. One all-reduce over a flat buffer carries every gradient plus a has-gradient flag each.
    """
    count = world_size()
    if count == 1:
        return
    params = _trainable(parameters)
    if not params:
        return
    device = params[0].device
    flags = torch.tensor([float(p.grad is not None) for p in params], device=device)
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params]
                     + [flags])
    dist.all_reduce(flat)
    offset = 0
    for param, touched in zip(params, flat[-len(params):].tolist()):
        chunk = flat[offset:offset + param.numel()].view_as(param)
        offset += param.numel()
        if touched:
            param.grad = (chunk / count).to(param.dtype)


def gather_objects(value: Any) -> list[Any]:
    """Every rank's `value` (picklable), in rank order; `[value]` in a single process."""
    if world_size() == 1:
        return [value]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, value)
    return gathered
