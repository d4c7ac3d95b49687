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

With ``balance`` (``ddlkit.strategies.balance``) ranks take uneven shares of
the same global batch, by speed, and each weighs its loss by its share, so
the step stays exact. The all-reduce is timed on every ``time_every``-th step
and split into idle and transfer time (``ddlkit.strategies.commtimer``).
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Any

import torch
from accelerate.utils import DistributedDataParallelKwargs

from ..config import RunConfig
from ..knobs import integer, number
from ..models import loss_fn
from ..rank.strategy import OptimizerFactory, RankContext, StepStats, Strategy
from ..registry import StrategySpec, register
from . import compression
from .balance import KNOBS as BALANCE_KNOBS
from .balance import Balancer
from .commtimer import CommTimer
from .state import WholeState


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
        self.time_every, self.sample_work_s = cfg.time_every, cfg.sample_work_s
        self.balancer = Balancer(cfg, self.dp_rank, self.dp_size)
        state, hook = compression.hook_for(cfg)
        self.comm = CommTimer(hook, device=accelerator.device)  # times whichever hook sends the gradients
        self.ddp = isinstance(self.model, torch.nn.parallel.DistributedDataParallel)
        if isinstance(self.model, torch.nn.parallel.DistributedDataParallel):  # not with one process
            self.model.register_comm_hook(state=state, hook=self.comm.hook)
        self.ctx: RankContext | None = None
        self.comm_share = 0.0  # of the step's time, on the latest sampled step: unsampled steps are split by it

    def setup(self, ctx: RankContext) -> None:
        self.ctx = self.comm.ctx = ctx
        self.balancer.start(ctx)

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> StepStats:
        step = self.ctx.step if self.ctx is not None else 0
        sampled = self.ddp and step % self.time_every == 0
        self.comm.start(sampled, simulated_s=len(inputs) * self.sample_work_s)
        scale = self.balancer.scale(len(inputs))  # uneven shares: weigh each rank's mean by its samples
        micro = list(zip(inputs.chunk(self.micro_steps), targets.chunk(self.micro_steps), strict=True))
        losses = []
        for i, (x, y) in enumerate(micro):
            # all micro-batches but the last only accumulate; the last one's backward all-reduces the sum
            with self.accelerator.no_sync(self.model) if i < len(micro) - 1 else nullcontext():
                part = loss_fn(self.task, self.model(x), y)
                part = part * (len(x) / len(inputs)) if len(micro) > 1 else part  # no op to add with one
                self.accelerator.backward(part * scale if scale != 1.0 else part)  # DDP all-reduces in backward
            losses.append(part.detach())
        loss = torch.stack(losses).sum() if len(losses) > 1 else losses[0]
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - self.comm.began
        row: dict[str, Any] = {}
        if sampled:
            self.comm_share = min(self.comm.comm_s / elapsed, 1.0)
            row = {"idle_s": self.comm.idle_s, "transfer_s": self.comm.transfer_s}
        comm_s = self.comm.comm_s if sampled else elapsed * self.comm_share
        if self.ctx is not None:
            self.balancer.after(self.ctx, step, len(inputs), self.comm.busy_s)
        return StepStats(loss, compute_s=max(elapsed - comm_s, 0.0), comm_s=comm_s, row=row)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every rank holds the whole model: rank 0's copy is the full state."""
        model = self.accelerator.unwrap_model(self.model)
        return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


SAMPLE_WORK = number(
    "sample_work_s",
    0.0,
    0.0,
    None,
    "teaching: seconds of simulated compute per sample (a sleep scaled by the rank's speed), so that work follows "
    "the shares even on a busy machine",
)


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
    if cfg.grad_accumulation > 1 and cfg.balance != "none":
        raise ValueError(
            f"balance={cfg.balance!r} is invalid with grad_accumulation={cfg.grad_accumulation}: shares are set per "
            "step of batch_size samples; use balance='none' or grad_accumulation=1"
        )


def accumulation(cfg: RunConfig) -> int:
    return int(cfg.grad_accumulation)


register(
    StrategySpec(
        "data",
        DataParallel,
        "data parallel (DDP): every rank the whole model, a shard of each batch, gradients all-reduced",
        knobs=(
            *compression.KNOBS,
            *BALANCE_KNOBS,
            SAMPLE_WORK,
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
