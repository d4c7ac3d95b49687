"""Data parallelism: every rank holds the whole model, takes its own shard of
each global batch, and gradients are averaged across ranks before every
optimizer step, so N ranks with batch B step exactly like one process with
batch N*B. The averaging is PyTorch's DistributedDataParallel, set up by
accelerate; with one process (strategy ``single``) accelerate leaves the model
unwrapped and the same step is plain training.
"""

import time  # no `from __future__ import annotations`: DDP checks the hook's annotations as objects
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from ..config import RunConfig
from ..models import loss_fn
from ..rank.strategy import OptimizerFactory, StepStats, Strategy
from ..registry import StrategySpec, register
from .state import WholeState


class CommTimer:
    """Wraps DDP's all-reduce hook to add up how long the all-reduces take."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def hook(self, state: Any, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        start = time.perf_counter()

        def done(fut: torch.futures.Future[torch.Tensor]) -> torch.Tensor:
            self.seconds += time.perf_counter() - start
            return fut.value()

        return allreduce_hook(state, bucket).then(done)


class DataParallel(WholeState, Strategy):
    def __init__(
        self, cfg: RunConfig, accelerator: Any, model: torch.nn.Module, task: str, make_optimizer: OptimizerFactory
    ):
        self.accelerator = accelerator
        self.task = task
        self.model, self.optimizer = accelerator.prepare(model, make_optimizer(model.parameters()))
        self.dp_rank, self.dp_size = accelerator.process_index, accelerator.num_processes
        self.comm = CommTimer()
        if isinstance(self.model, torch.nn.parallel.DistributedDataParallel):
            self.model.register_comm_hook(state=None, hook=self.comm.hook)

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> StepStats:
        start, self.comm.seconds = time.perf_counter(), 0.0
        loss = loss_fn(self.task, self.model(inputs), targets)
        self.accelerator.backward(loss)  # DDP all-reduces gradient buckets during backward
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - start
        return StepStats(loss.detach(), compute_s=max(elapsed - self.comm.seconds, 0.0), comm_s=self.comm.seconds)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every rank holds the whole model: rank 0's copy is the full state."""
        model = self.accelerator.unwrap_model(self.model)
        return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def one_process(cfg: RunConfig) -> None:
    if cfg.world_size != 1:
        raise ValueError(
            f"world_size={cfg.world_size} is invalid for strategy='single': it must be 1 "
            "(use strategy='data' for several processes)"
        )


register(
    StrategySpec(
        "single",
        DataParallel,
        "one process, plain training: the reference every strategy is compared with",
        layout=one_process,
        checkpoint="consolidated",
        portable=True,
        position=0,
    )
)
register(
    StrategySpec(
        "data",
        DataParallel,
        "data parallel (DDP): every rank the whole model, a shard of each batch, gradients all-reduced",
        checkpoint="consolidated",
        portable=True,
        position=1,
    )
)
