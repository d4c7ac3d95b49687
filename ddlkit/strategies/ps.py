"""Parameter server: servers hold the parameters, workers push gradients.

Ranks ``0..servers-1`` are servers, each holding a shard of the parameters
(whole tensors, balanced by size) and its own optimizer; the other ranks are
workers, which shard the data among themselves. A worker step: compute a
gradient on the parameters it last read, push each server its slice, receive
each server's fresh parameters and version. The server is one thread on
``dist.recv(src=None)`` + ``send`` (torch.distributed point-to-point), so
messages are handled one at a time in arrival order and every version number
is exact (FIELD-NOTES).

Versions and staleness. A server's version counts the optimizer steps it has
applied. A gradient read at version ``r`` and applied at version ``a`` has
staleness ``a - r``: how many updates it missed. The ``sync`` knob:

- ``async``: every gradient is applied on arrival as its own step.
- ``ssp`` with bound ``s``: updates are applied per clock (step number): when
  every worker has pushed clock ``c``, their mean gradient (summed in worker
  rank order) becomes version ``c + 1``. A worker may start step ``n`` only
  when version ``n - s`` exists, so its gradient for clock ``n`` was read at
  version ``>= n - s`` and applied at version ``n``: staleness ``<= s``.
- ``bsp``: ``ssp`` with ``s = 0``: every worker waits for every clock, all read
  the same version, staleness is always 0, and the result does not depend on
  arrival order (tested against ``ssp`` with ``s = 0`` under a straggler).

``staleness_lr`` divides a gradient by its staleness (with SGD: lr / staleness);
``max_staleness`` (async) drops gradients older than that (``dropped`` events).
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist

from .. import events
from ..config import RunConfig
from ..knobs import choice, flag, integer
from ..models import loss_fn
from ..rank.strategy import OptimizerFactory, RankContext, StepStats, Strategy
from ..registry import StrategySpec, register
from .sharding import grad_or_zeros, load_flat

GRADIENT, DONE = 0.0, 1.0
PUSH_HEADER = 3  # kind, step (clock), version read
REPLY_HEADER = 3  # version, staleness of the pushed gradient, dropped


def shard_parameters(sizes: list[int], servers: int) -> list[list[int]]:
    """Parameter indices per server: biggest first onto the least loaded.

    >>> shard_parameters([100, 10, 60, 50], 2)
    [[0, 1], [2, 3]]
    """
    load = [0] * servers
    shards: list[list[int]] = [[] for _ in range(servers)]
    for index in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        server = load.index(min(load))
        shards[server].append(index)
        load[server] += sizes[index]
    return [sorted(s) for s in shards]


class ParameterServer(Strategy):
    def __init__(
        self, cfg: RunConfig, accelerator: Any, model: torch.nn.Module, task: str, make_optimizer: OptimizerFactory
    ):
        self.cfg, self.task, self.model = cfg, task, model
        self.rank, world_size = accelerator.process_index, accelerator.num_processes
        self.servers = list(range(cfg.servers))
        self.workers = list(range(cfg.servers, world_size))
        self.is_server = self.rank in self.servers
        # Data is sharded over the workers only; a server's shard is unused.
        self.dp_rank, self.dp_size = max(self.rank - cfg.servers, 0), len(self.workers)
        params = list(model.parameters())
        self.shards = [
            [params[i] for i in shard] for shard in shard_parameters([p.numel() for p in params], cfg.servers)
        ]
        self.lr = cfg.lr
        self.optimizer = make_optimizer(self.shards[self.rank]) if self.is_server else None
        self.versions = [0] * len(self.servers)  # every rank starts from the same seeded weights: version 0
        self.replies = [torch.empty(REPLY_HEADER + sum(p.numel() for p in s)) for s in self.shards]
        self.steps_done = 0

    def set_lr(self, lr: float) -> None:
        self.lr = lr
        if self.optimizer is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = lr

    def setup(self, ctx: RankContext) -> None:
        self.ctx = ctx  # a worker pauses between computing and pushing (``ctx.straggle``)
        dist.barrier()  # start together (ranks finish starting up at different times): scripted delays stay exact

    def serves(self) -> bool:
        return self.is_server

    # ---- server -------------------------------------------------------------
    def serve(self, ctx: RankContext) -> dict[str, Any]:
        """Apply gradients as they arrive, until every worker says it is done."""
        server = ServerState(self, ctx)
        message = torch.empty(PUSH_HEADER + sum(p.numel() for p in self.shards[self.rank]))
        while len(server.done) < len(self.workers):  # a stop reaches the workers; each then says it is done
            ctx.tick(server.version, self)  # live lr, faults, progress for the hang detector
            wait_from = time.perf_counter()
            src = dist.recv(message)  # any worker: one message at a time, in arrival order
            server.idle_s += time.perf_counter() - wait_from
            kind, step, read = message[0].item(), int(message[1].item()), int(message[2].item())
            if kind == DONE:
                server.done.add(src)
            elif self.cfg.sync == "async":
                server.apply_now(src, step, read, message[PUSH_HEADER:])
            else:
                server.clocks.setdefault(step, {})[src] = (read, message[PUSH_HEADER:].clone())
                server.steps_of[src], server.waiting[src], server.last_read[src] = step + 1, step + 1, read
            server.apply_complete_clocks()
        steps = max(server.steps_of.values())
        samples = sum(server.steps_of.values()) * self.cfg.batch_size
        return {
            "steps": steps,
            "samples": samples,
            "train_s": time.perf_counter() - server.started,
            "stopped": steps < self.cfg.steps,
        }

    def apply(self, gradients: list[tuple[int, torch.Tensor]]) -> None:
        """One optimizer step with the mean of these (staleness, flat gradient)
        pairs, summed in the order given."""
        assert self.optimizer is not None
        total = torch.zeros_like(gradients[0][1])
        for staleness, grad in gradients:
            total.add_(grad / max(staleness, 1) if self.cfg.staleness_lr else grad)
        total /= len(gradients)
        offset = 0
        for p in self.shards[self.rank]:
            p.grad = total[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        self.optimizer.step()

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Servers 1.. send their shards to server 0, which returns the full state; a
        worker returns the parameters it last pulled (what held-out evaluation measures)."""
        if not self.is_server:
            return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        flat = torch.cat([p.detach().flatten() for p in self.shards[self.rank]])
        if self.rank != 0:
            dist.send(flat, dst=0)
            return {}
        for server in self.servers[1:]:
            incoming = torch.empty(sum(p.numel() for p in self.shards[server]))
            dist.recv(incoming, src=server)
            load_flat(self.shards[server], incoming)
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}

    # ---- worker -------------------------------------------------------------
    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> StepStats:
        """A gradient on the parameters last read, pushed to every server; their
        replies bring the next parameters (and, in bsp/ssp, the wait for the slowest)."""
        start = time.perf_counter()
        self.model.zero_grad(set_to_none=True)
        loss = loss_fn(self.task, self.model(inputs), targets)
        loss.backward()
        compute_s = time.perf_counter() - start
        self.ctx.straggle(start)  # a slow worker's gradient arrives late
        wait_from = time.perf_counter()
        pushes = [
            dist.isend(self.message(GRADIENT, s, [grad_or_zeros(p) for p in params]), dst=s)
            for s, params in enumerate(self.shards)
        ]
        pulls = [dist.irecv(self.replies[s], src=s) for s in self.servers]
        for work in pushes + pulls:
            if work is not None:  # None only for ranks outside the group
                work.wait()
        wait_s = time.perf_counter() - wait_from
        staleness = max(int(r[1].item()) for r in self.replies)
        for s, params in enumerate(self.shards):
            self.versions[s] = int(self.replies[s][0].item())
            load_flat(params, self.replies[s][REPLY_HEADER:])
        self.steps_done += 1
        dropped = any(bool(r[2].item()) for r in self.replies)
        row = {"wait_s": wait_s, "staleness": staleness, "version": self.versions[0], "dropped": dropped}
        return StepStats(loss.detach(), compute_s=compute_s, comm_s=wait_s, row=row)

    def message(self, kind: float, server: int, tensors: list[torch.Tensor]) -> torch.Tensor:
        """What a worker sends a server: kind, its step (clock), the version it read, then ``tensors``, flat."""
        head = torch.tensor([kind, self.steps_done, self.versions[server]])
        return torch.cat([head, *[t.flatten() for t in tensors]])

    def finish(self, ctx: RankContext) -> dict[str, Any]:
        """A worker tells every server it is done."""
        if not self.is_server:
            for s, params in enumerate(self.shards):
                dist.send(self.message(DONE, s, [torch.zeros_like(p) for p in params]), dst=s)
        return {}


class ServerState:
    """One server's bookkeeping: its version, the clocks (bsp/ssp) being filled,
    the workers waiting to start their next step, and its idle time."""

    def __init__(self, ps: ParameterServer, ctx: RankContext):
        self.ps, self.reporter = ps, ctx.reporter
        self.bound = 0 if ps.cfg.sync == "bsp" else ps.cfg.staleness_bound
        self.version, self.done, self.steps_of = 0, set[int](), {w: 0 for w in ps.workers}
        self.clocks: dict[int, dict[int, tuple[int, torch.Tensor]]] = {}  # clock -> worker -> (read, gradient)
        self.waiting: dict[int, int] = {}  # worker -> the step it wants to start next
        self.last_read: dict[int, int] = {}  # worker -> the version its last gradient was computed on
        self.idle_s, self.started = 0.0, time.perf_counter()

    def apply_now(self, worker: int, step: int, read: int, gradient: torch.Tensor) -> None:
        """async: every gradient is its own update (or dropped, if too stale)."""
        staleness = self.version - read
        dropped = self.ps.cfg.max_staleness is not None and staleness > self.ps.cfg.max_staleness
        self.steps_of[worker] = step + 1
        self.update_event(worker, step, read, self.version, dropped)
        if not dropped:
            self.ps.apply([(staleness, gradient)])
            self.version += 1
        self.reply(worker, staleness, dropped)

    def apply_complete_clocks(self) -> None:
        """bsp/ssp: apply every complete clock, in order, then release the
        workers the bound now allows to start their next step."""
        workers = self.ps.workers
        while self.version in self.clocks and all(w in self.clocks[self.version] or w in self.done for w in workers):
            pushed = self.clocks.pop(self.version)
            for worker in sorted(pushed):
                self.update_event(worker, self.version, pushed[worker][0], self.version)
            self.ps.apply([(self.version - read, grad) for _, (read, grad) in sorted(pushed.items())])
            self.version += 1
        for worker, next_step in list(self.waiting.items()):
            if self.version >= next_step - self.bound:
                del self.waiting[worker]
                self.reply(worker, (next_step - 1) - self.last_read[worker])  # applied at version = its clock

    def update_event(self, worker: int, step: int, read: int, applied: int, dropped: bool = False) -> None:
        update = events.Update(
            type="update",
            worker=worker,
            step=step,
            read_version=read,
            applied_version=applied,
            staleness=applied - read,
            dropped=dropped,
            idle_s=self.idle_s,
        )
        self.reporter.send(update)
        self.idle_s = 0.0

    def reply(self, worker: int, staleness: int = 0, dropped: bool = False) -> None:
        head = torch.tensor([self.version, staleness, float(dropped)])
        dist.send(torch.cat([head, *[p.detach().flatten() for p in self.ps.shards[self.ps.rank]]]), dst=worker)


SYNC_MODES = ("bsp", "async", "ssp")


def layout(cfg: RunConfig) -> None:
    if cfg.servers >= cfg.world_size:
        raise ValueError(
            f"servers={cfg.servers} is invalid with world_size={cfg.world_size}: "
            f"at least one rank must be a worker; valid: 1..{cfg.world_size - 1}"
        )
    if cfg.max_staleness is not None and cfg.sync != "async":
        raise ValueError(
            f"max_staleness={cfg.max_staleness} is invalid with sync={cfg.sync!r}: "
            "bsp and ssp bound staleness already; valid only with sync='async'"
        )


KNOBS = (
    integer("servers", 1, 1, "servers", "ranks 0..servers-1 serve parameter shards, the others work", up_to=63),
    choice("sync", "async", SYNC_MODES, "sync", "bsp: all wait for all; async: none waits; ssp: a bounded lead"),
    integer("staleness_bound", 1, 0, "staleness bound (ssp)", "ssp: steps a worker may run ahead of the slowest"),
    flag("staleness_lr", False, None, "divide a gradient by its staleness"),
    integer("max_staleness", None, 0, None, "async: drop gradients staler than this", allow_none=True),
)
register(
    StrategySpec(
        "ps",
        ParameterServer,
        "parameter servers hold the weights, workers push gradients: bsp, async or ssp, with exact staleness",
        knobs=KNOBS,
        layout=layout,
        dp_size=lambda cfg: cfg.world_size - cfg.servers,
        lockstep=False,
        cpu_only=True,
        position=2,
        evaluator=lambda cfg: cfg.servers,  # the first worker: it holds every server's latest parameters
    )
)
