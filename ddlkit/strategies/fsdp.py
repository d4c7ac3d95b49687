"""Fully sharded data parallelism (FSDP2, ``fully_shard``): data parallelism
in which no rank keeps the whole model.

Each rank stores 1/N of every parameter, of its gradient and of the optimizer
state (the optimizer only ever sees the local shards). Before a block's
forward the ranks all-gather its parameters, and free them after; in backward
they gather them again, and the gradients are reduce-scattered: summed and
averaged across ranks, each rank keeping the slice it owns. So N ranks with
batch B step exactly like one process with batch N*B (as DDP does), with
about 1/N of the parameter, gradient and optimizer memory per rank, paid for
with more communication (DDP: one all-reduce of the gradients; FSDP: two
all-gathers of the parameters plus a reduce-scatter).

Sharding each block separately (then the root for what is left) is what
bounds memory: only one block is gathered at a time.
"""
from __future__ import annotations

import time

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard

from ..models import CharTransformer, loss_fn
from . import OptimizerFactory, StepStats
from .sharding import full_state_dict


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The blocks sharded (and gathered) one at a time: transformer blocks, or
    the layers of a flat stack that have parameters."""
    if isinstance(model, CharTransformer):
        return list(model.blocks)
    return [layer for layer in model.children() if any(True for _ in layer.parameters())]


class FullyShardedDataParallel:
    def __init__(self, cfg, dp_mesh: DeviceMesh, model: nn.Module, task: str, make_optimizer: OptimizerFactory):
        self.task = task
        for block in shard_units(model):
            fully_shard(block, mesh=dp_mesh)
        self.model = fully_shard(model, mesh=dp_mesh)
        self.optimizer = make_optimizer(self.model.parameters())  # local shards only
        self.dp_rank, self.dp_size = dp_mesh.get_local_rank(), dp_mesh.size()

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> StepStats:
        # All-gathers and reduce-scatters run inside forward and backward
        # (overlapped with compute), so there is no separate comm time here.
        start = time.perf_counter()
        loss = loss_fn(self.task, self.model(inputs), targets)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepStats(loss.detach(), compute_s=time.perf_counter() - start, comm_s=0.0)

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return full_state_dict(self.model)
