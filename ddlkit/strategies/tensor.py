"""Tensor parallelism (Megatron-style): every rank holds a slice of every
big matrix and all ranks work on the same batch.

An MLP ``down(act(up(x)))`` is split so that it needs one all-reduce:
``up`` is cut by output columns (``ColwiseParallel``: rank r computes its
share of the hidden features, no communication), the elementwise activation
works on the slices, and ``down`` is cut by input rows (``RowwiseParallel``:
each rank's partial product is summed across ranks, the one all-reduce).
Attention is the same with heads as the columns: q, k, v column-wise (each
rank gets whole heads), o row-wise. The backward mirrors it: one all-reduce of
the input gradient per pair. Norms, embeddings and leftover layers stay
replicated; their gradients come out identical on every rank.

The sharded weights are DTensors over ``tp_mesh`` (``parallelize_module``);
``full_state_dict`` all-gathers them. In the hybrid dp x tp layout, each
shard's gradient is also averaged over its data-parallel replicas (``dp_mesh``).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel, parallelize_module

from ..config import RunConfig
from ..knobs import integer
from ..models import LM_HEADS, CharTransformer, loss_fn
from ..rank.strategy import OptimizerFactory, StepStats, Strategy
from ..registry import StrategySpec, register
from .compression import averager_for
from .sharding import average_gradients, full_state_dict
from .state import WholeState


def megatron_plan(model: nn.Module) -> dict[str, ParallelStyle]:
    """Column-then-row pairs for a built-in model, by submodule name.

    >>> mlp = nn.Sequential(nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 10))
    >>> sorted(megatron_plan(mlp))
    ['0', '2']
    """
    if isinstance(model, CharTransformer):
        plan: dict[str, ParallelStyle] = {}
        for i in range(len(model.blocks)):
            for name in ("q", "k", "v", "up"):
                plan[f"blocks.{i}.{name}"] = ColwiseParallel()
            for name in ("o", "down"):
                plan[f"blocks.{i}.{name}"] = RowwiseParallel()
        return plan
    # A flat stack: consecutive Linear layers pair up (column, row); the
    # layers in between (ReLU) are elementwise, so they work on the slices.
    linears = [name for name, layer in model.named_children() if isinstance(layer, nn.Linear)]
    pairs = zip(linears[0::2], linears[1::2], strict=False)  # an odd last layer stays whole
    return {name: style for col, row in pairs for name, style in ((col, ColwiseParallel()), (row, RowwiseParallel()))}


class TensorParallel(WholeState, Strategy):
    def __init__(
        self,
        cfg: RunConfig,
        tp_mesh: DeviceMesh,
        model: nn.Module,
        task: str,
        make_optimizer: OptimizerFactory,
        dp_mesh: DeviceMesh | None = None,
    ):
        self.task = task
        self.model = parallelize_module(model, tp_mesh, megatron_plan(model))
        self.optimizer = make_optimizer(self.model.parameters())
        self.dp_group = dp_mesh.get_group() if dp_mesh is not None else None
        self.dp_rank, self.dp_size = (dp_mesh.get_local_rank(), dp_mesh.size()) if dp_mesh is not None else (0, 1)
        self.averager = averager_for(cfg, self.dp_group)  # hybrid dp x tp with compression

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> StepStats:
        start = time.perf_counter()
        # Forward and backward: the all-reduces of each column/row pair happen
        # inside (DTensor redistributes), so they count as compute here.
        loss = loss_fn(self.task, self.model(inputs), targets)
        loss.backward()
        comm_s = average_gradients(self.model.parameters(), self.dp_group, self.averager)  # hybrid dp x tp only
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - start
        return StepStats(loss.detach(), compute_s=max(elapsed - comm_s, 0.0), comm_s=comm_s)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return full_state_dict(self.model)


def build(
    cfg: RunConfig, accelerator: Any, model: nn.Module, task: str, make_optimizer: OptimizerFactory
) -> TensorParallel:
    """Every rank a slice of every big matrix, over a 1-D ``tp`` mesh."""
    mesh = init_device_mesh(accelerator.device.type, (cfg.world_size,), mesh_dim_names=("tp",))
    return TensorParallel(cfg, mesh["tp"], model, task, make_optimizer)


def check_split(cfg: RunConfig) -> None:
    """Rules of any tensor-parallel split (here and in the hybrid dp x tp)."""
    if cfg.hidden % cfg.tp:
        raise ValueError(
            f"hidden={cfg.hidden} is invalid for tp={cfg.tp}: tensor parallelism splits the hidden "
            f"features evenly, so hidden must be a multiple of tp"
        )
    if cfg.model == "lm" and LM_HEADS % cfg.tp:
        raise ValueError(
            f"tp={cfg.tp} is invalid for model='lm': its {LM_HEADS} attention heads must split evenly "
            f"over the tp ranks (valid tp: 1, 2, 4)"
        )


def layout(cfg: RunConfig) -> None:
    if cfg.world_size < 2:
        raise ValueError(
            f"world_size={cfg.world_size} is invalid for strategy='tensor': every rank holds a slice, "
            "so world_size >= 2 (strategy='single' for one process)"
        )
    if cfg.tp != cfg.world_size:
        raise ValueError(
            f"tp={cfg.tp} is invalid for strategy='tensor' with world_size={cfg.world_size}: "
            f"tp must equal world_size (>= 2) (strategy='hybrid' combines tp with dp)"
        )
    check_split(cfg)


TP = integer("tp", 1, 1, "tp", "tensor-parallel degree (tensor: = world_size)", up_to=64)

register(
    StrategySpec(
        "tensor",
        build,
        "tensor parallel (Megatron): every rank a slice of every big matrix, DTensor over a DeviceMesh",
        knobs=(TP,),
        layout=layout,
        dp_size=lambda cfg: 1,
        derived=lambda cfg: {"tp": cfg.world_size},  # every rank a slice
        checkpoint="consolidated",  # whole, by single-process names: any layout goes on from it
        portable=True,
        position=5,
    )
)
