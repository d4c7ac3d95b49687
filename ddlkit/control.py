"""Changing a running run: learning rate, pause/resume, stop, slowed ranks.

The kernel sends a change to every rank over its authenticated channel
(``Run.control``). Ranks that step in lockstep must switch at the same step,
or their replicas drift apart (one rank stepping with the old learning rate
while the others use the new). So the ranks do not act on what they received:
about every ``SYNC_S`` seconds of training, rank 0 broadcasts the controls it
holds to all ranks, and everyone applies them at that step. The broadcast also
carries when the next one will be, so every rank calls it at the same steps;
between them a step costs one comparison.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch.distributed as dist

SYNC_S = 0.1  # how often, in training time, the ranks agree on the controls
PAUSE_POLL_S = 0.25  # while paused, how often rank 0 re-broadcasts (keeps collectives inside their timeout)

# What Run.control accepts, with a check for each value.
CONTROLS = {
    "lr": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0,
    "paused": lambda v: isinstance(v, bool),
    "stop": lambda v: v is True,
    "slowdown": lambda v: isinstance(v, dict) and all(
        isinstance(r, int) and isinstance(f, (int, float)) and f >= 1 for r, f in v.items()),
}
VALID = {"lr": "a positive number", "paused": "True or False", "stop": "True",
         "slowdown": "a dict {rank: factor >= 1}, e.g. {1: 3.0} makes rank 1 three times slower"}


def check(changes: dict[str, Any]) -> None:
    """Raise a ValueError naming the control, the value and what is valid."""
    for name, value in changes.items():
        if name not in CONTROLS:
            raise ValueError(f"control {name!r} is unknown: valid controls are {sorted(CONTROLS)}")
        if not CONTROLS[name](value):
            raise ValueError(f"control {name}={value!r} is invalid: it must be {VALID[name]}")


@dataclass
class Controls:
    """What every rank applies at a sync step."""

    version: int = 0
    lr: float | None = None
    paused: bool = False
    stop: bool = False
    slowdown: dict[int, float] = field(default_factory=dict)
    next_sync: int = 0  # the step of the next broadcast

    def slowdown_of(self, rank: int) -> float:
        return float(self.slowdown.get(rank, 1.0))


def follow_lr(live: Controls, lr: float, set_lr: Callable[[float], None]) -> float:
    """The learning rate in force after this step's controls; ``set_lr`` is
    called when it changes."""
    if live.lr is not None and live.lr != lr:
        set_lr(live.lr)
        return live.lr
    return lr


class ControlSync:
    """The worker's side: call :meth:`at_step` at the start of every step on
    every rank; it returns the controls in force for that step."""

    def __init__(self, reporter, rank: int, world_size: int, collective: bool = True):
        self.reporter = reporter
        self.rank = rank
        # collective=False (parameter servers, hogwild: ranks not in lockstep, a
        # broadcast would deadlock or serialise them): every rank adopts the
        # controls it received itself; rank 0 still reports the change.
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
        self._report(step, new)
        self.current = new

    def _agree(self, step: int, wait: float = 0.0) -> Controls:
        """Rank 0's view of the controls, the same on every rank."""
        proposal = None
        if self.rank == 0 or not self.distributed:
            if wait:
                self.reporter.control_changed.wait(wait)
            self.reporter.control_changed.clear()
            proposal = Controls(**{**self.reporter.controls, "version": self.reporter.control_version})
            proposal.next_sync = step + self._interval(step)
        if not self.distributed:
            return proposal
        box = [proposal]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _interval(self, step: int) -> int:
        """Steps until the next sync: about SYNC_S of training, from the time
        the steps since the last sync took."""
        if self._step_started is None:
            return 1
        last_step, started = self._step_started
        per_step = (time.perf_counter() - started) / max(step - last_step, 1)
        return max(1, min(1000, int(SYNC_S / max(per_step, 1e-6))))

    def _report(self, step: int, new: Controls) -> None:
        if self.rank != 0 or new.version == self.current.version:
            return
        old = self.current
        changed = {name: getattr(new, name) for name in CONTROLS if getattr(new, name) != getattr(old, name)}
        if changed:
            # json wants string keys; the slowdown map goes as {"1": 3.0}
            if "slowdown" in changed:
                changed["slowdown"] = {str(r): f for r, f in changed["slowdown"].items()}
            self.reporter.send({"type": "control", "step": step, **changed}, now=True)
