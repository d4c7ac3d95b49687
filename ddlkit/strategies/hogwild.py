"""Hogwild: several processes update one model in shared memory, without locks.

Every rank maps the same block of memory and points its model's parameters
into it, so an optimizer step by any rank writes the one copy that all ranks
read. Nothing orders the writes: a rank's forward pass may read parameters
that another rank is updating halfway (Recht et al., 2011: with sparse enough
updates this still converges).

ddlkit starts ranks as fresh interpreters (no fork), so the memory is shared
through a file, not inherited. The file has no name anyone could guess,
pre-create or point a symlink at: rank 0 makes an anonymous one
(``memfd_create``, mode 0600), writes the initial weights into it and tells
the others (over the process group, not the store) its pid, descriptor and
inode. They open it through ``/proc/<pid>/fd/<fd>``, which the kernel allows
only to processes of the same user, and refuse it unless it is that very
inode, owned by them and private. Once every rank has it mapped, rank 0
closes its descriptor; the memory lives as long as a mapping does and
vanishes with the last rank, however the ranks end. Nothing is ever written
to ``/dev/shm``.

Staleness is approximate. A shared counter (the first bytes of the same
memory) counts updates: a rank reads it before its forward pass and again
when it applies its update; the difference is how many updates other ranks
made meanwhile. The increments are lock-free too (load, add, store), so two
ranks can lose one, and the parameters read were never a consistent snapshot
anyway.
"""

from __future__ import annotations

import mmap
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

PARAMS_AT = 64  # bytes: the clock (an int64) first, the parameters on their own cache line


def create_shared(nbytes: int) -> tuple[int, mmap.mmap]:
    """Anonymous memory (a descriptor and its mapping) only this user can open."""
    if not hasattr(os, "memfd_create"):
        raise RuntimeError("hogwild shares its parameters through memfd_create, which only Linux has")
    fd = os.memfd_create("ddlkit-hogwild", os.MFD_CLOEXEC)
    os.fchmod(fd, 0o600)
    os.ftruncate(fd, nbytes)
    return fd, mmap.mmap(fd, nbytes)


def attach_shared(owner: int, fd: int, identity: tuple[int, int], nbytes: int) -> mmap.mmap:
    """Map the memory that process ``owner`` holds as ``fd``, if it is the file
    ``identity`` (device, inode) it announced, owned by this user, private and
    of the size expected; anything else is refused."""
    try:
        own = os.open(f"/proc/{owner}/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise RuntimeError(
            f"hogwild: cannot open rank 0's shared memory ({exc}): every rank must run on one machine, as one user"
        ) from None
    try:
        info = os.fstat(own)
        found = (info.st_dev, info.st_ino)
        if found != tuple(identity) or info.st_uid != os.geteuid() or info.st_mode & 0o077 or info.st_size != nbytes:
            raise RuntimeError(
                f"hogwild: refusing to map /proc/{owner}/fd/{fd}: it is not the private memory rank 0 created "
                f"(inode {found}, uid {info.st_uid}, mode {oct(info.st_mode)}, {info.st_size} bytes)"
            )
        return mmap.mmap(own, nbytes)
    finally:
        os.close(own)


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
        self.memory: mmap.mmap | None = None

    def setup(self, ctx: RankContext) -> None:
        """Point the parameters into the shared memory (all ranks, together)."""
        params = list(self.model.parameters())
        numel = sum(p.numel() for p in params)
        nbytes = PARAMS_AT + 4 * numel
        where: list[Any] = [None]
        if self.rank == 0:  # create it first, with the initial weights
            fd, memory = create_shared(nbytes)
            flat = torch.frombuffer(memory, dtype=torch.float32, count=numel, offset=PARAMS_AT)
            flat.copy_(torch.cat([p.detach().flatten() for p in params]))
            info = os.fstat(fd)
            where = [(os.getpid(), fd, (info.st_dev, info.st_ino))]
        dist.broadcast_object_list(where, src=0)
        if self.rank != 0:
            owner, fd, identity = where[0]
            memory = attach_shared(owner, fd, identity, nbytes)
        dist.barrier()  # everyone has it mapped: rank 0's descriptor can go
        if self.rank == 0:
            os.close(fd)
        self.memory = memory  # the tensors below borrow it: it must outlive them
        self.clock = torch.frombuffer(memory, dtype=torch.int64, count=1)
        flat = torch.frombuffer(memory, dtype=torch.float32, count=numel, offset=PARAMS_AT)
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
