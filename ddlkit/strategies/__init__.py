"""Strategies: one file per parallelism.

A strategy receives the model and what it needs to parallelise it (the
accelerator, later process groups or a device mesh), wraps the model, and does
one training step. Adding a parallelism means adding one module here and one
line to ``build_strategy``.

What the training loop (``ddlkit.worker.train``) asks of a strategy:

- ``dp_rank``, ``dp_size``: this rank's place among the data-parallel
  replicas; the loop shards data by them (pipeline stages or tensor shards of
  one replica see the same batch).
- ``step(inputs, targets) -> StepStats``: one optimizer step on this rank's
  batch (the global batch of a replica is ``batch_size`` samples).
- ``set_lr(lr)``: change the learning rate (all ranks do it at the same step).
- ``full_state_dict()``: called on every rank (it may gather); rank 0's return
  is the full model state on CPU, saved as the run's result.
- ``optimizer``: the torch optimizer of this rank's parameters; the worker's
  ``ddlkit.memory.MemoryMeter`` reads parameters, gradients and state from it.

- Checkpoints (``ddlkit.checkpoint``), for ``checkpoint_every`` / restarts /
  resume / live resize:
  ``checkpoint_sharded`` (bool attribute): False = consolidated, rank 0's
  ``checkpoint_state()`` is saved as one ``state.pt`` and EVERY rank is given
  it back (any world size may resume); True = every rank saves and gets back
  its own ``rank<r>.pt`` (resuming needs the same layout).
  ``checkpoint_state() -> dict``: model and optimizer (and scheduler) state,
  tensors/numbers/containers only (loaded with ``weights_only=True``); called
  on every rank at the same step (it may gather). RNG, step and lr are added
  by the checkpointer.
  ``load_checkpoint_state(state)``: put that state back, before the first step.

Model parallelism (``pipeline``, ``tensor``, ``fsdp``, ``hybrid``) lives in
``pipeline.py``, ``tensor.py``, ``fsdp.py``; ``hybrid.py`` builds their
device mesh and hands each its dimensions.

A strategy whose ranks do not step in lockstep (``ps``, ``hogwild``) defines
``run(dataset, shard, controls, straggler, reporter, run_dir) -> summary`` and
owns its loop; ``controls`` then applies live changes without a collective.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

from ..config import MODEL_PARALLEL, RunConfig

OptimizerFactory = Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]


@dataclass
class StepStats:
    """One rank's view of one step. ``comm_s`` is time in gradient communication
    (including waiting there for slower peers); ``compute_s`` is the rest of the
    step's forward, backward and optimizer time."""

    loss: torch.Tensor
    compute_s: float
    comm_s: float
    # Events the worker sends for this step, adding "step" (pipeline spans).
    events: list[dict] = field(default_factory=list)


def make_optimizer(cfg: RunConfig) -> OptimizerFactory:
    def factory(params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
        if cfg.optimizer == "sgd":
            return torch.optim.SGD(params, lr=cfg.lr)
        if cfg.optimizer == "adam":
            return torch.optim.Adam(params, lr=cfg.lr)
        return torch.optim.AdamW(params, lr=cfg.lr)

    return factory


def build_strategy(cfg: RunConfig, accelerator, model: torch.nn.Module, task: str):
    from .data import DataParallel
    from .hogwild import Hogwild
    from .ps import ParameterServer

    if cfg.strategy in MODEL_PARALLEL:
        from .hybrid import build_on_mesh

        return build_on_mesh(cfg, accelerator.device, model, task, make_optimizer(cfg))
    strategies = {"single": DataParallel, "data": DataParallel, "ps": ParameterServer, "hogwild": Hogwild}
    return strategies[cfg.strategy](cfg, accelerator, model, task, make_optimizer(cfg))
