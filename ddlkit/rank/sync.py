"""Agreeing on live changes: the rank's side of ``Run.control``.

The kernel sends a change to every rank over its authenticated channel. Ranks
that step in lockstep must switch at the same step, or their replicas drift
apart (one rank stepping with the old learning rate while the others use the
new). So the ranks do not act on what they received: about every ``SYNC_S``
seconds of training, rank 0 broadcasts the controls it holds to all ranks, and
everyone applies them at that step. The broadcast also carries when the next
one will be, so every rank calls it at the same steps; between them a step
costs one comparison.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import cast

import torch.distributed as dist

from .. import events
from ..controls import Controls, to_json
from .emulated import unmetered
from .reporter import Reporter

SYNC_S = 0.1  # how often, in training time, the ranks agree on the controls
PAUSE_POLL_S = 0.25  # while paused, how often rank 0 re-broadcasts (keeps collectives inside their timeout)


def follow_lr(live: Controls, lr: float, set_lr: Callable[[float], None]) -> float:
    """The learning rate in force after this step's controls; ``set_lr`` is
    called when it changes."""
    if live.lr is not None and live.lr != lr:
        set_lr(live.lr)
        return live.lr
    return lr


class ControlSync:
    """Call :meth:`at_step` at the start of every step on every rank; it
    returns the controls in force for that step. With ``collective=False``
    (ranks not in lockstep: a broadcast would deadlock or serialise them)
    every rank adopts the controls it received itself; rank 0 still reports."""

    def __init__(self, reporter: Reporter, rank: int, world_size: int, collective: bool = True):
        self.reporter = reporter
        self.rank = rank
        self.distributed = collective and world_size > 1 and dist.is_initialized()
        self.current = Controls()
        self._step_started: tuple[int, float] | None = None

    def at_step(self, step: int) -> Controls:
        if step < self.current.next_sync:
            return self.current
        self._adopt(step, self._agree(step))
        while self.current.paused and not self.current.stop:  # every rank waits here, together
            self._adopt(step, self._agree(step, wait=PAUSE_POLL_S))
        self._step_started = (step, time.perf_counter())
        return self.current

    def _adopt(self, step: int, new: Controls) -> None:
        if self.rank == 0 and new.version != self.current.version:
            changed = new.changed_since(self.current)
            if changed:
                control = cast(events.Control, {"type": "control", "step": step, **to_json(changed)})
                self.reporter.send(control, now=True)
        self.current = new

    def _agree(self, step: int, wait: float = 0.0) -> Controls:
        """Rank 0's view of the controls, the same on every rank."""
        proposal = None
        if self.rank == 0 or not self.distributed:
            proposal = self.reporter.take_controls(wait)
            proposal.next_sync = step + self._interval(step)
        if not self.distributed:
            assert proposal is not None
            return proposal
        box = [proposal]
        with unmetered():  # ddlkit's own traffic: not the run's communication
            dist.broadcast_object_list(box, src=0)
        agreed = box[0]
        assert agreed is not None  # rank 0 always proposes
        return agreed

    def _interval(self, step: int) -> int:
        """Steps until the next sync: about SYNC_S of training, from the time
        the steps since the last sync took."""
        if self._step_started is None:
            return 1
        last_step, started = self._step_started
        per_step = (time.perf_counter() - started) / max(step - last_step, 1)
        return max(1, min(1000, int(SYNC_S / max(per_step, 1e-6))))
