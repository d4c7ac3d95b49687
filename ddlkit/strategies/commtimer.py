"""Timing DDP's gradient communication, cheaply, and splitting it into idle
and transfer time.

:class:`CommTimer` wraps the strategy's DDP comm hook (the plain all-reduce,
or whichever compression hook the strategy chose) and is called by DDP for
each gradient bucket during backward. At the step's first bucket the rank's
compute is (all but) done, so every step it:

- takes the rank's straggler pause there (``ctx.straggle``: a slow device's
  gradient reaches the collective late, as it would for real). The work a
  speed or ``slowdown`` scales is then the step's compute: reading the batch,
  forward and backward (not the all-reduce, nor the optimizer's update);
- notes ``busy_s``, that work with its pause (a balancer's measure).

Only on a *sampled* step (every ``time_every`` steps) does it time anything
more: a one-element all-reduce before the gradients' collective, whose
duration is ``idle_s`` (waiting for the slowest peer to arrive), then each
bucket's hook until its future completes, whose sum is ``transfer_s`` (moving
the bytes, with the hook's compression). ``comm_s`` of a sampled step is the
wall-clock window from the first bucket's hook to the last bucket's
completion, read on separate clocks: ``idle_s + transfer_s`` matches it
within timer noise when the buckets do not overlap. Unsampled steps cost one
clock read and one attribute test per bucket (see docs/load-balancing.md for
the measured cost and for how the unsampled steps' compute/comm split is
estimated).

Python hooks cost more than the hook's own lines: DDP calls the hook holding
the GIL, and the plain all-reduce's ``future.then(...)`` runs a Python callback
on gloo's thread, which must take the GIL back from the training thread (with
this wrapper, 37-65 µs a step over no hook measured here: 1.3-2.3 % of a 2.8 ms
step; DDP without a hook does all of it in C++). So on an unsampled step the *last* bucket of the plain
all-reduce is reduced synchronously and handed back as a completed future: it is
the last gradient to become ready, so there is no backward computation left for
it to overlap with, and no callback thread is woken (11-28 µs over no hook
measured: the call, and the division DDP's C++ path fuses into its copy into the
bucket). Its arithmetic is torch's ``allreduce_hook``'s: divide by the group's
size, then sum.
"""

import time  # no `from __future__ import annotations`: DDP checks the hook's annotations as objects
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from ..rank.strategy import RankContext

Hook = Callable[[Any, dist.GradBucket], torch.futures.Future[torch.Tensor]]


class CommTimer:
    """Wraps a DDP comm hook (``inner``, called with ``state``); see the module doc."""

    def __init__(
        self, inner: Hook = allreduce_hook, group: dist.ProcessGroup | None = None, device: str | torch.device = "cpu"
    ) -> None:
        self.inner = inner
        self.group = group
        self.device = device  # of the one-element all-reduce: NCCL reduces only CUDA tensors
        self.ctx: RankContext | None = None  # set by the strategy's setup: stragglers pause in the hook
        self.sampled = False
        self.simulated_s = 0.0
        self._first = True
        self.began = 0.0
        self.busy_s = 0.0
        self.idle_s = 0.0
        self.transfer_s = 0.0
        self._window = (0.0, 0.0)

    def start(self, sampled: bool, simulated_s: float = 0.0) -> None:
        """Call as the step's work begins; ``sampled``: the same on every rank at that step;
        ``simulated_s``: simulated compute the straggler pause adds (``sample_work_s``)."""
        self.sampled, self._first, self.simulated_s = sampled, True, simulated_s
        self.idle_s = self.transfer_s = self.busy_s = 0.0
        self.began = time.perf_counter()

    @property
    def comm_s(self) -> float:
        """A sampled step's communication window (first hook to last completion)."""
        return max(self._window[1] - self._window[0], 0.0)

    def hook(self, state: Any, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        if self._first:
            self._first = False
            work_started = self.began if self.ctx is None else min(self.ctx.step_started, self.began)
            if self.ctx is not None:
                self.ctx.straggle(work_started, self.simulated_s)
            now = time.perf_counter()
            self.busy_s = now - work_started
            if self.sampled:
                self._window = (now, now)
                dist.all_reduce(torch.zeros(1, device=self.device), group=self.group)  # when the last rank arrives
                self.idle_s = time.perf_counter() - now
        if not self.sampled:
            if self.inner is allreduce_hook and bucket.is_last():
                return allreduce_now(state, bucket)
            return self.inner(state, bucket)
        start = time.perf_counter()

        def done(fut: torch.futures.Future[torch.Tensor]) -> torch.Tensor:
            end = time.perf_counter()
            self.transfer_s += end - start
            self._window = (self._window[0], end)
            return fut.value()

        return self.inner(state, bucket).then(done)


def allreduce_now(group: dist.ProcessGroup | None, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """``allreduce_hook``'s result, reduced before returning (no callback on gloo's thread)."""
    buffer = bucket.buffer()
    buffer.div_(dist.get_world_size(group))
    dist.all_reduce(buffer, group=group)  # waits with the GIL released
    done: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    done.set_result(buffer)
    return done
