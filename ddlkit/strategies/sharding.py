"""What several strategies share: reading sharded (DTensor) state back as full
tensors, averaging gradients across data-parallel replicas, and parameters
packed into and out of one flat tensor (one message)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from ..rank.memory import local

# (flat gradients, their shapes) -> their mean over the replicas: a compression hook (compression.BucketAverager)
Averager = Callable[[torch.Tensor, list[torch.Size]], torch.Tensor]


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model on CPU under the single-process names. Sharded entries
    are all-gathered, so every rank must call it (in the same order)."""
    state = {}
    for name, value in model.state_dict().items():
        full = value.full_tensor() if isinstance(value, DTensor) else value
        state[name] = full.detach().cpu().clone()
    return state


def average_gradients(
    params: Iterable[torch.nn.Parameter], group: dist.ProcessGroup | None, averager: Averager | None = None
) -> float:
    """Average this rank's (local) gradients over the data-parallel replicas
    in ``group``, as one flat all-reduce (or through ``averager``: a
    compression hook); returns the seconds it took. Replicas take equal
    batches, so the average is the gradient of the global batch."""
    grads = [local(p.grad) for p in params if p.grad is not None]
    if group is None or not grads:
        return 0.0
    start = time.perf_counter()
    flat = torch.cat([g.reshape(-1) for g in grads])
    if averager is None:
        dist.all_reduce(flat, group=group)
        flat /= dist.get_world_size(group)
    else:
        flat = averager(flat, [g.shape for g in grads])
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
    return time.perf_counter() - start


def grad_or_zeros(param: torch.nn.Parameter) -> torch.Tensor:
    """A parameter's gradient, or zeros if it got none (messages keep their size)."""
    return param.grad if param.grad is not None else torch.zeros_like(param)


def load_flat(params: list[torch.nn.Parameter], flat: torch.Tensor) -> None:
    """Copy a flat tensor into parameters, in order."""
    offset = 0
    with torch.no_grad():
        for p in params:
            p.copy_(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
