"""The device mesh of the model-parallel strategies, and 2-D hybrids.

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
one all-reduce over the column's process group after the backward.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh

from . import OptimizerFactory


def build_on_mesh(cfg, device: torch.device, model: nn.Module, task: str, make_optimizer: OptimizerFactory):
    """Create the mesh ``cfg`` describes (validated by ``ddlkit.layout``) and
    the strategy on it. Called by every rank, after the default process group
    is up."""
    from .fsdp import FullyShardedDataParallel
    from .pipeline import PipelineParallel
    from .tensor import TensorParallel

    if cfg.strategy == "fsdp":
        mesh = init_device_mesh(device.type, (cfg.world_size,), mesh_dim_names=("dp",))
        return FullyShardedDataParallel(cfg, mesh["dp"], model, task, make_optimizer)
    split = "pp" if cfg.pp > 1 else "tp"
    dp = cfg.dp if cfg.strategy == "hybrid" else 1
    mesh = init_device_mesh(device.type, (dp, cfg.world_size // dp), mesh_dim_names=("dp", split))
    dp_mesh = mesh["dp"] if dp > 1 else None
    if split == "pp":
        return PipelineParallel(cfg, mesh["pp"], model, task, make_optimizer, device, dp_mesh=dp_mesh)
    return TensorParallel(cfg, mesh["tp"], model, task, make_optimizer, dp_mesh=dp_mesh)
