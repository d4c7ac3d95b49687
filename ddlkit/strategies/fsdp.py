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
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard

from ..config import RunConfig
from ..models import CharTransformer
from ..rank.strategy import OptimizerFactory, StepStats, Strategy, local_step
from ..registry import StrategySpec, register
from .sharding import full_state_dict
from .state import WholeState


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The blocks sharded (and gathered) one at a time: transformer blocks, or
    the layers of a flat stack that have parameters."""
    if isinstance(model, CharTransformer):
        return list(model.blocks)
    return [layer for layer in model.children() if any(True for _ in layer.parameters())]


class FullyShardedDataParallel(WholeState, Strategy):
    def __init__(self, dp_mesh: DeviceMesh, model: nn.Module, task: str, make_optimizer: OptimizerFactory):
        self.task = task
        for block in shard_units(model):
            fully_shard(block, mesh=dp_mesh)
        fully_shard(model, mesh=dp_mesh)  # in place: the model is now an FSDPModule too
        self.model = model
        self.optimizer = make_optimizer(self.model.parameters())  # local shards only
        self.dp_rank, self.dp_size = dp_mesh.get_local_rank(), dp_mesh.size()

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> StepStats:
        # All-gathers and reduce-scatters run inside forward and backward
        # (overlapped with compute), so there is no separate comm time here.
        start = time.perf_counter()
        loss = local_step(self.model, self.task, self.optimizer, inputs, targets)
        return StepStats(loss, compute_s=time.perf_counter() - start, comm_s=0.0)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return full_state_dict(self.model)


def build(
    cfg: RunConfig, accelerator: Any, model: nn.Module, task: str, make_optimizer: OptimizerFactory
) -> FullyShardedDataParallel:
    mesh = init_device_mesh(accelerator.device.type, (cfg.world_size,), mesh_dim_names=("dp",))
    return FullyShardedDataParallel(mesh["dp"], model, task, make_optimizer)


def layout(cfg: RunConfig) -> None:
    if cfg.world_size < 2:
        raise ValueError(
            f"world_size={cfg.world_size} is invalid for strategy='fsdp': it shards over all ranks, "
            "so world_size >= 2 (strategy='single' for one process)"
        )


register(
    StrategySpec(
        "fsdp",
        build,
        "fully sharded data parallel (FSDP2): data parallel with 1/N of the "
        "parameters, gradients and optimizer state per rank",
        layout=layout,
        position=6,
        checkpoint="consolidated",  # whole, by single-process names: any layout goes on from it
        portable=True,
    )
)
