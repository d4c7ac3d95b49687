"""Hogwild: several processes update one model in shared memory, without locks.

Every rank maps the same file (``/dev/shm``: memory, not disk) and points its
model's parameters into it, so an optimizer step by any rank writes the one
copy that all ranks read. Nothing orders the writes: a rank's forward pass may
read parameters that another rank is updating halfway (Recht et al., 2011:
with sparse enough updates this still converges).

ddlkit starts ranks as fresh interpreters (no fork), so the memory is shared
through the file, not inherited: rank 0 creates it with the initial weights,
the others map it, and once all have it mapped rank 0 removes its name (the
mappings stay valid, and a killed run leaves nothing in ``/dev/shm``).

Staleness is approximate. A shared counter (in a second mapping) counts
updates: a rank reads it before its forward pass and again when it applies
its update; the difference is how many updates other ranks made meanwhile.
The increments are lock-free too (load, add, store), so two ranks can lose
one, and the parameters read were never a consistent snapshot anyway.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch
import torch.distributed as dist

from .. import events
from ..config import RunConfig
from ..models import loss_fn
from ..rank.strategy import OptimizerFactory, RankContext, StepStats, Strategy
from ..registry import StrategySpec, register


def shared_tensor(path: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A tensor backed by a file every process can map (created if missing)."""
    return torch.from_file(path, shared=True, size=numel, dtype=dtype)


class Hogwild(Strategy):
    def __init__(
        self, cfg: RunConfig, accelerator: Any, model: torch.nn.Module, task: str, make_optimizer: OptimizerFactory
    ):
        self.cfg, self.task, self.model = cfg, task, model
        self.rank, world_size = accelerator.process_index, accelerator.num_processes
        self.dp_rank, self.dp_size = self.rank, world_size
        self.make_optimizer = make_optimizer
        self.optimizer: torch.optim.Optimizer | None = None
        self.steps_done = 0

    def setup(self, ctx: RankContext) -> None:
        """Point the parameters into the shared file (all ranks, together)."""
        params = list(self.model.parameters())
        base = f"/dev/shm/ddlkit-hogwild-{ctx.run_dir.name}"  # the run id: unique
        if self.rank == 0:  # create it first, with the initial weights
            flat = shared_tensor(base + ".params", sum(p.numel() for p in params), torch.float32)
            flat.copy_(torch.cat([p.detach().flatten() for p in params]))
            shared_tensor(base + ".clock", 1, torch.int64).zero_()
        dist.barrier()
        flat = shared_tensor(base + ".params", sum(p.numel() for p in params), torch.float32)
        self.clock = shared_tensor(base + ".clock", 1, torch.int64)
        dist.barrier()  # everyone has it mapped: the names can go
        if self.rank == 0:
            os.unlink(base + ".params")
            os.unlink(base + ".clock")
        offset = 0
        for p in params:
            p.data = flat[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
        self.optimizer = self.make_optimizer(params)  # per-rank (SGD keeps no state to share)

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> StepStats:
        """One lock-free update, with the clock read before and at the update."""
        assert self.optimizer is not None
        start = time.perf_counter()
        read = int(self.clock.item())
        self.optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(self.task, self.model(inputs), targets)
        loss.backward()
        self.optimizer.step()  # writes the shared parameters in place
        applied = int(self.clock.item())
        self.clock += 1  # not atomic: a concurrent increment can be lost
        update = events.Update(
            type="update",
            worker=self.rank,
            step=self.steps_done,
            read_version=read,
            applied_version=applied,
            staleness=applied - read,
            dropped=False,
        )
        self.steps_done += 1
        return StepStats(
            loss.detach(),
            compute_s=time.perf_counter() - start,
            comm_s=0.0,
            row={"staleness": applied - read, "version": applied},
            events=[update],
        )

    def finish(self, ctx: RankContext) -> dict[str, Any]:
        dist.barrier()  # every update is in: all ranks see the same final parameters
        state = self.full_state_dict()
        return {
            "updates": int(self.clock.item()),
            "param_checksum": float(sum(v.double().sum() for v in state.values())),
        }

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}


register(
    StrategySpec(
        "hogwild",
        Hogwild,
        "lock-free updates of one model in shared memory (Recht et al. 2011)",
        lockstep=False,
        cpu_only=True,
        position=3,
    )
)
