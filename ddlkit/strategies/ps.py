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
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..control import follow_lr
from ..models import loss_fn
from . import OptimizerFactory

GRADIENT, DONE = 0.0, 1.0
PUSH_HEADER = 3  # kind, step (clock), version read
REPLY_HEADER = 3  # version, staleness of the pushed gradient, dropped


def shard_parameters(sizes: list[int], servers: int) -> list[list[int]]:
    """Parameter indices per server: biggest first onto the least loaded.

    >>> shard_parameters([100, 10, 60, 50], 2)
    [[0, 1], [2, 3]]
    """
    load, shards = [0] * servers, [[] for _ in range(servers)]
    for index in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        server = load.index(min(load))
        shards[server].append(index)
        load[server] += sizes[index]
    return [sorted(s) for s in shards]


class ParameterServer:
    def __init__(self, cfg, accelerator, model: torch.nn.Module, task: str, make_optimizer: OptimizerFactory):
        self.cfg, self.task, self.model = cfg, task, model
        self.rank, world_size = accelerator.process_index, accelerator.num_processes
        self.servers = list(range(cfg.servers))
        self.workers = list(range(cfg.servers, world_size))
        self.is_server = self.rank in self.servers
        # Data is sharded over the workers only; a server's shard is unused.
        self.dp_rank, self.dp_size = max(self.rank - cfg.servers, 0), len(self.workers)
        params = list(model.parameters())
        self.shards = [[params[i] for i in shard] for shard in shard_parameters([p.numel() for p in params],
                                                                                cfg.servers)]
        self.lr = cfg.lr
        if self.is_server:
            self.optimizer = make_optimizer(self.shards[self.rank])

    def set_lr(self, lr: float) -> None:
        self.lr = lr
        if self.is_server:
            for group in self.optimizer.param_groups:
                group["lr"] = lr

    def run(self, dataset, shard, controls, straggler, reporter, run_dir: Path) -> dict[str, Any]:
        dist.barrier()  # start together (ranks finish starting up at different times): scripted delays stay exact
        if self.is_server:
            return self.serve(controls, reporter, run_dir)
        return self.work(dataset, shard, controls, straggler, reporter)

    # ---- server -------------------------------------------------------------
    def serve(self, controls, reporter, run_dir: Path) -> dict[str, Any]:
        cfg, mine = self.cfg, self.shards[self.rank]
        message = torch.empty(PUSH_HEADER + sum(p.numel() for p in mine))
        bound = 0 if cfg.sync == "bsp" else cfg.staleness_bound
        version, done, steps_of = 0, set(), {w: 0 for w in self.workers}
        clocks: dict[int, dict[int, tuple[int, torch.Tensor]]] = {}  # clock -> worker -> (read, gradient)
        waiting: dict[int, int] = {}  # worker -> the step it wants to start next
        last_read: dict[int, int] = {}  # worker -> the version its last gradient was computed on
        idle_s, started = 0.0, time.perf_counter()

        def update_event(worker, step, read, applied, dropped=False):
            nonlocal idle_s
            reporter.send({"type": "update", "worker": worker, "step": step, "read_version": read,
                           "applied_version": applied, "staleness": applied - read, "dropped": dropped,
                           "idle_s": idle_s})
            idle_s = 0.0

        def reply(worker, staleness=0, dropped=False):
            head = torch.tensor([version, staleness, float(dropped)])
            dist.send(torch.cat([head, *[p.detach().flatten() for p in mine]]), dst=worker)

        while len(done) < len(self.workers):  # a stop reaches the workers; each then says it is done
            follow_lr(controls.at_step(version), self.lr, self.set_lr)  # set_lr keeps self.lr
            wait_from = time.perf_counter()
            src = dist.recv(message)  # any worker: one message at a time, in arrival order
            idle_s += time.perf_counter() - wait_from
            kind, step, read = message[0].item(), int(message[1].item()), int(message[2].item())
            if kind == DONE:
                done.add(src)
            elif cfg.sync == "async":
                staleness = version - read
                dropped = cfg.max_staleness is not None and staleness > cfg.max_staleness
                steps_of[src] = step + 1
                update_event(src, step, read, version, dropped)
                if not dropped:
                    self.apply([(staleness, message[PUSH_HEADER:])])
                    version += 1
                reply(src, staleness, dropped)
            else:
                clocks.setdefault(step, {})[src] = (read, message[PUSH_HEADER:].clone())
                steps_of[src], waiting[src], last_read[src] = step + 1, step + 1, read
            # bsp/ssp: apply every complete clock, in order, then release the
            # workers the bound now allows to start their next step.
            while version in clocks and all(w in clocks[version] or w in done for w in self.workers):
                pushed = clocks.pop(version)
                for worker in sorted(pushed):
                    update_event(worker, version, pushed[worker][0], version)
                self.apply([(version - read, grad) for _, (read, grad) in sorted(pushed.items())])
                version += 1
            for worker, next_step in list(waiting.items()):
                if version >= next_step - bound:
                    del waiting[worker]
                    reply(worker, (next_step - 1) - last_read[worker])  # applied at version = its clock
            reporter.last_step = version  # progress, for the hang detector
        train_s = time.perf_counter() - started

        state = self.gather_state()
        if self.rank == 0:
            from ..worker import save_atomic

            save_atomic(state, run_dir / "final_state.pt")
        steps = max(steps_of.values())
        return {"steps": steps, "samples": sum(steps_of.values()) * cfg.batch_size, "train_s": train_s,
                "stopped": steps < cfg.steps}

    def apply(self, gradients: list[tuple[int, torch.Tensor]]) -> None:
        """One optimizer step with the mean of these (staleness, flat gradient)
        pairs, summed in the order given."""
        total = None
        for staleness, grad in gradients:
            scaled = grad / max(staleness, 1) if self.cfg.staleness_lr else grad
            total = scaled.clone() if total is None else total.add_(scaled)
        total /= len(gradients)
        offset = 0
        for p in self.shards[self.rank]:
            p.grad = total[offset:offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        self.optimizer.step()

    def gather_state(self) -> dict[str, torch.Tensor]:
        """Servers 1.. send their shards to server 0, which returns the full state."""
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
    def work(self, dataset, shard, controls, straggler, reporter) -> dict[str, Any]:
        from ..worker import inject_fault
        from ..elastic import attempt_number, faults_for

        cfg = self.cfg
        faults = faults_for(cfg, self.rank, attempt_number())
        versions = [0] * len(self.servers)  # every rank starts from the same seeded weights: version 0
        replies = [torch.empty(REPLY_HEADER + sum(p.numel() for p in s)) for s in self.shards]
        steps_done = 0
        for step in range(cfg.steps):
            live = controls.at_step(step)
            if live.stop:
                break
            step_start = time.perf_counter()
            index = shard.indices(step)
            if step in faults:
                inject_fault(faults[step], step)
            self.model.zero_grad(set_to_none=True)
            loss = loss_fn(self.task, self.model(dataset.inputs[index]), dataset.targets[index])
            loss.backward()
            compute_s = time.perf_counter() - step_start
            straggler.delay(live, step_start)

            # push a gradient slice to every server, then read every server's reply
            wait_from = time.perf_counter()
            pushes = [dist.isend(torch.cat([torch.tensor([GRADIENT, step, versions[s]]),
                                            *[p.grad.flatten() for p in params]]), dst=s)
                      for s, params in enumerate(self.shards)]
            pulls = [dist.irecv(replies[s], src=s) for s in self.servers]
            for work in pushes + pulls:
                work.wait()
            wait_s = time.perf_counter() - wait_from
            staleness = max(int(r[1].item()) for r in replies)
            for s, params in enumerate(self.shards):
                versions[s] = int(replies[s][0].item())
                load_flat(params, replies[s][REPLY_HEADER:])
            steps_done = step + 1
            if step % cfg.log_every == 0 or step == cfg.steps - 1:
                reporter.step(step, loss=loss.detach(), samples=len(index), lr=live.lr or self.lr,
                              step_time=time.perf_counter() - step_start, compute_s=compute_s, comm_s=wait_s,
                              wait_s=wait_s, staleness=staleness, version=versions[0],
                              dropped=any(bool(r[2].item()) for r in replies))
            else:
                reporter.last_step = step
        for s in self.servers:
            dist.send(torch.tensor([DONE, steps_done, 0.0, *[0.0] * sum(p.numel() for p in self.shards[s])]), dst=s)
        return {"steps": steps_done}


def load_flat(params: list[torch.nn.Parameter], flat: torch.Tensor) -> None:
    offset = 0
    with torch.no_grad():
        for p in params:
            p.copy_(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
