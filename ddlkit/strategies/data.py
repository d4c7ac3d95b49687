"""Data parallelism: every rank holds the whole model, takes its own shard of
each global batch, and gradients are averaged across ranks before every
optimizer step, so N ranks with batch B step exactly like one process with
batch N*B. The averaging is PyTorch's DistributedDataParallel, set up by
accelerate; with one process (strategy ``single``) accelerate leaves the model
unwrapped and the same step is plain training.
"""
from __future__ import annotations

import time

import torch
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from ..models import loss_fn
from . import OptimizerFactory, StepStats


class CommTimer:
    """Wraps DDP's all-reduce hook to add up how long the all-reduces take."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def hook(self, _state, bucket):
        start = time.perf_counter()

        def done(fut):
            self.seconds += time.perf_counter() - start
            return fut.value()

        return allreduce_hook(None, bucket).then(done)


class DataParallel:
    checkpoint_sharded = False  # every rank holds the whole model: rank 0 saves one consolidated copy

    def __init__(self, cfg, accelerator, model: torch.nn.Module, task: str, make_optimizer: OptimizerFactory):
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

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every rank holds the whole model: rank 0's copy is the full state."""
        model = self.accelerator.unwrap_model(self.model)
        return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}

    def checkpoint_state(self) -> dict:
        model = self.accelerator.unwrap_model(self.model)
        return {"model": model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_checkpoint_state(self, state: dict) -> None:
        self.accelerator.unwrap_model(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
