"""Hybrid parallelism: 2-D device meshes, data parallel over pipeline or tensor-parallel replicas.

A DeviceMesh names the ranks along each kind of parallelism. One dimension:
``pipeline`` (pp), ``tensor`` (tp), ``fsdp`` (dp). Two, for ``hybrid``: a
``(dp, pp)`` or ``(dp, tp)`` grid with ``world_size = dp * pp`` (or tp).
With 4 ranks as dp=2 x pp=2::

            pp=0  pp=1
    dp=0  [  0     1  ]   replica 0: stage 0 on rank 0, stage 1 on rank 1
    dp=1  [  2     3  ]   replica 1: the same stages, another half of the batch

Along a row ranks split the model (activations flow between them); down a
column they hold the same part and average its gradients. Plain DDP cannot do
the column's averaging around a pipeline stage (it fails, or with
``static_graph`` is silently wrong), so the strategies do it themselves with
one all-reduce over the column's process group after the backward, or,
with ``compression=`` (as for ``data``), through the same DDP communication
hook applied to the column's gradients as one bucket
(``compression.BucketAverager``).
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.distributed.device_mesh import init_device_mesh

from ..config import RunConfig
from ..knobs import integer
from ..rank.strategy import OptimizerFactory, Strategy
from ..registry import StrategySpec, register
from . import compression
from .pipeline import PIPELINE_KNOBS, PP, PipelineParallel, check_stages
from .tensor import TP, TensorParallel, check_split


def build(cfg: RunConfig, accelerator: Any, model: nn.Module, task: str, make_optimizer: OptimizerFactory) -> Strategy:
    """The ``(dp, pp)`` or ``(dp, tp)`` mesh ``cfg`` describes, and the strategy on it."""
    split = "pp" if cfg.pp > 1 else "tp"
    mesh = init_device_mesh(accelerator.device.type, (cfg.dp, cfg.world_size // cfg.dp), mesh_dim_names=("dp", split))
    if split == "pp":
        return PipelineParallel(cfg, mesh["pp"], model, task, make_optimizer, accelerator.device, dp_mesh=mesh["dp"])
    return TensorParallel(cfg, mesh["tp"], model, task, make_optimizer, dp_mesh=mesh["dp"])


def layout(cfg: RunConfig) -> None:
    dp, pp, tp, n = cfg.dp, cfg.pp, cfg.tp, cfg.world_size
    if dp * pp * tp != n:
        raise ValueError(
            f"dp={dp} x pp={pp} x tp={tp} = {dp * pp * tp} is invalid for world_size={n}: "
            f"the degrees of the mesh must multiply to world_size"
        )
    if dp < 2 or (pp > 1) == (tp > 1):
        raise ValueError(
            f"dp={dp}, pp={pp}, tp={tp} is invalid for strategy='hybrid': it is a 2-D mesh, "
            f"dp >= 2 times exactly one of pp or tp >= 2 (dp x pp or dp x tp)"
        )
    if pp > 1:
        check_stages(cfg)
    else:
        check_split(cfg)
    compression.check(cfg)


DP = integer("dp", 1, 1, "dp", "data-parallel replicas of the 2-D mesh", up_to=64)

register(
    StrategySpec(
        "hybrid",
        build,
        "a 2-D mesh: data parallel over pipeline or tensor parallel replicas",
        knobs=(DP, PP, TP, *PIPELINE_KNOBS, *compression.KNOBS),
        layout=layout,
        dp_size=lambda cfg: cfg.dp,
        checkpoint="consolidated",  # whole, by single-process names: any layout goes on from it
        portable=True,
        position=7,
    )
)
