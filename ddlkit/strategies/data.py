"""Data parallelism: every rank holds the whole model, takes its own shard of
each global batch, and gradients are averaged across ranks before every
optimizer step, so N ranks with batch B step exactly like one process with
batch N*B. The averaging is PyTorch's DistributedDataParallel, set up by
accelerate; with one process (strategy ``single``) accelerate leaves the model
unwrapped and the same step is plain training.

Knobs of ``data``: ``compression`` (the DDP communication hook that sends the
gradients: ``ddlkit.strategies.compression``) and ``grad_accumulation=k``: a
step takes k micro-batches of ``batch_size``, all-reducing only after the last
(DDP ``no_sync`` for the others), so it is exactly one step of batch k*B with k
times fewer all-reduces per sample.
"""

import time  # no `from __future__ import annotations`: DDP checks the hook's annotations as objects
from contextlib import nullcontext
from typing import Any

import torch
import torch.distributed as dist
from accelerate.utils import DistributedDataParallelKwargs
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from ..config import RunConfig
from ..knobs import integer
from ..models import loss_fn
from ..rank.strategy import OptimizerFactory, StepStats, Strategy
from ..registry import StrategySpec, register
from . import compression
from .state import WholeState


class CommTimer:
    """Wraps the DDP communication hook the strategy uses (plain all-reduce or
    a compression hook) to add up how long its communication takes."""

    def __init__(self, inner: Any = allreduce_hook, state: Any = None) -> None:
        self.seconds = 0.0
        self.inner, self.state = inner, state

    def hook(self, state: Any, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        start = time.perf_counter()

        def done(fut: torch.futures.Future[torch.Tensor]) -> torch.Tensor:
            self.seconds += time.perf_counter() - start
            return fut.value()

        return self.inner(self.state, bucket).then(done)


class DataParallel(WholeState, Strategy):
    def __init__(
        self, cfg: RunConfig, accelerator: Any, model: torch.nn.Module, task: str, make_optimizer: OptimizerFactory
    ):
        self.accelerator = accelerator
        self.task = task
        if cfg.compression == "powersgd":  # one bucket: see compression.ONE_BUCKET
            accelerator.ddp_handler = DistributedDataParallelKwargs(bucket_cap_mb=compression.ONE_BUCKET_MB)
        self.model, self.optimizer = accelerator.prepare(model, make_optimizer(model.parameters()))
        self.dp_rank, self.dp_size = accelerator.process_index, accelerator.num_processes
        self.micro_steps = cfg.grad_accumulation  # 1 for "single": its knobs stay at their defaults
        state, hook = compression.hook_for(cfg)
        self.comm = CommTimer(hook, state)
        if isinstance(self.model, torch.nn.parallel.DistributedDataParallel):
            self.model.register_comm_hook(state=None, hook=self.comm.hook)

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> StepStats:
        start, self.comm.seconds = time.perf_counter(), 0.0
        micro = list(zip(inputs.chunk(self.micro_steps), targets.chunk(self.micro_steps), strict=True))
        losses = []
        for i, (x, y) in enumerate(micro):
            # all micro-batches but the last only accumulate; the last one's backward all-reduces the sum
            with self.accelerator.no_sync(self.model) if i < len(micro) - 1 else nullcontext():
                part = loss_fn(self.task, self.model(x), y) / len(micro)
                self.accelerator.backward(part)  # DDP all-reduces gradient buckets during backward
            losses.append(part.detach())
        loss = torch.stack(losses).sum()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - start
        return StepStats(loss, compute_s=max(elapsed - self.comm.seconds, 0.0), comm_s=self.comm.seconds)

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


def data_layout(cfg: RunConfig) -> None:
    compression.check(cfg)


def accumulation(cfg: RunConfig) -> int:
    return int(cfg.grad_accumulation)


register(
    StrategySpec(
        "data",
        DataParallel,
        "data parallel (DDP): every rank the whole model, a shard of each batch, gradients all-reduced",
        knobs=(
            *compression.KNOBS,
            integer(
                "grad_accumulation",
                1,
                1,
                "grad accumulation",
                "micro-batches of batch_size per step; all-reduce after the last only",
                up_to=1024,
            ),
        ),
        layout=data_layout,
        checkpoint="consolidated",
        portable=True,
        position=1,
        accumulation=accumulation,
    )
)
