"""What a strategy is, to the rank loop (``ddlkit.rank.loop``).

A strategy file in ``ddlkit/strategies/`` registers a
``ddlkit.registry.StrategySpec`` whose ``build`` returns an object of this
shape. The loop owns everything strategies share (controls, faults,
stragglers, logging, checkpoints, measurements); a strategy says how one rank
takes one step, and, if its ranks do not step together, plugs into the
loop's hooks:

- ``setup(ctx)`` before the first step (map shared memory, meet the peers);
- ``serves()``: True on a rank that serves instead of stepping through the
  data (a parameter server); the loop then calls ``serve(ctx)``, which
  returns the run's summary and calls ``ctx.tick(n)`` at each of its own
  ticks (controls, faults, progress);
- ``finish(ctx)`` after the last step (tell the servers, wait for the peers);
  what it returns is added to the summary.

Checkpoints: a spec with ``checkpoint`` set promises ``checkpoint_state()``
(model and optimizer state: tensors, numbers and containers, loaded back with
``weights_only=True``; called on every rank at the same step) and
``load_checkpoint_state(state)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from .. import registry
from ..config import RunConfig
from ..controls import Controls
from ..data import Dataset, ShardedStream
from ..events import Event
from ..models import loss_fn
from ..network import link_of
from .emulated import NETWORK
from .evaluate import HeldOut, due
from .faults import inject_fault
from .reporter import Reporter
from .stragglers import Straggler
from .sync import ControlSync, follow_lr

OptimizerFactory = Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]


@dataclass
class StepStats:
    """One rank's view of one step. ``comm_s`` is time in communication
    (including waiting there for slower peers); ``compute_s`` is the rest of
    the step's forward, backward and optimizer time. ``row`` adds fields to
    the step's row (a parameter-server worker's staleness); ``events`` are
    sent for the step (pipeline spans), each given its ``step``."""

    loss: torch.Tensor
    compute_s: float
    comm_s: float
    row: dict[str, Any] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)


@dataclass
class RankContext:
    """What the loop gives a strategy's hooks."""

    cfg: RunConfig
    rank: int
    world_size: int
    device: torch.device
    reporter: Reporter
    controls: ControlSync
    straggler: Straggler
    faults: dict[int, str]
    run_dir: Path
    dataset: Dataset
    shard: ShardedStream
    lr: float
    step: int = 0  # the step being taken, and when its work began (set by the loop before the strategy's step)
    step_started: float = 0.0
    straggled: bool = False  # this step's straggler pause was taken, by the strategy mid-step
    held_out: HeldOut | None = None  # on the rank that evaluates, with ``eval_every``

    def straggle(self, work_started: float, simulated_s: float = 0.0) -> float:
        """Pause as this rank's straggler settings say, for the work begun at
        ``work_started``. A strategy that communicates after computing calls it
        in between (a parameter-server worker: its gradient then arrives late,
        as a slow device's would); otherwise the loop calls it after the step.
        ``simulated_s``: simulated work to add (a sleep, scaled like the real work)."""
        self.straggled = True
        return self.straggler.delay(self.controls.current, work_started, simulated_s)

    def follow(self, live: Controls, strategy: Strategy) -> None:
        """Apply what changed in this step's controls: the learning rate, the
        emulated network, and the strategy's live knobs (set on ``cfg``, then ``strategy.on_knobs``)."""
        self.lr = follow_lr(live, self.lr, strategy.set_lr)
        if live.network is not None and live.network != self.cfg.network:
            self.cfg.network = live.network
            NETWORK.link = link_of(live.network)
        changed = {name: value for name, value in live.knobs.items() if getattr(self.cfg, name) != value}
        for name, value in changed.items():
            setattr(self.cfg, name, value)
        if changed:
            strategy.on_knobs(changed)

    def evaluate(self, done: int, strategy: Strategy, everyone: bool = False, stopped: bool = False) -> None:
        """After ``done`` steps (rounds), if an evaluation is due (every
        ``eval_every``, and after the last; ``stopped``: the run stopped there, so
        measure unless that step was due anyway): the evaluating rank measures
        ``strategy.full_state_dict()`` on the held-out data and sends an ``eval``
        event. ``everyone``: every rank calls this at the same steps and gives its
        state (a lockstep strategy's ``full_state_dict`` may gather)."""
        every = self.cfg.eval_every
        regular = due(done, every, registry.get(self.cfg.strategy).length(self.cfg))
        if every is None or regular == stopped or (self.held_out is None and not everyone):
            return
        state = strategy.full_state_dict()
        if self.held_out is not None:
            self.reporter.send(self.held_out.event(done, state))

    def tick(self, step: int, strategy: Strategy) -> Controls:
        """For a serving loop: the controls in force at its tick ``step`` (applied
        as :meth:`follow` does), faults fired, progress told."""
        live = self.controls.at_step(step)
        self.follow(live, strategy)
        if step in self.faults:
            inject_fault(self.faults.pop(step), step)
        self.reporter.last_step = step
        return live


class Strategy(Protocol):
    """One rank's part of a strategy. The methods with a body are defaults
    that a class subclassing this protocol inherits."""

    dp_rank: int  # this rank's place among the data-parallel replicas (data is sharded by it)
    dp_size: int
    optimizer: torch.optim.Optimizer | None  # this rank's (None: it updates nothing itself)

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> StepStats:
        """One optimizer step on this rank's batch."""
        ...

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Called on every rank (it may gather); rank 0's is the whole model on CPU."""
        ...

    def set_lr(self, lr: float) -> None:
        """All ranks of a lockstep strategy call it at the same step (one that updates nothing has no lr)."""
        for group in self.optimizer.param_groups if self.optimizer is not None else ():
            group["lr"] = lr

    def setup(self, ctx: RankContext) -> None:
        return None

    def serves(self) -> bool:
        return False

    def serve(self, ctx: RankContext) -> dict[str, Any]:
        raise RuntimeError(f"{type(self).__name__} serves on no rank")

    def finish(self, ctx: RankContext) -> dict[str, Any]:
        return {}

    def on_knobs(self, changed: dict[str, Any]) -> None:
        """Live knobs changed (already set on ``cfg``): act on them if reading ``cfg`` later is not enough."""
        return None


def local_step(
    model: torch.nn.Module, task: str, optimizer: torch.optim.Optimizer, inputs: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """Forward, backward and an optimizer step on this rank's model (whatever communication its
    wrapping does inside); returns the loss, detached."""
    loss = loss_fn(task, model(inputs), targets)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def make_optimizer(cfg: RunConfig) -> OptimizerFactory:
    """The config's optimizer for a set of parameters."""

    def factory(params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
        kind = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[cfg.optimizer]
        return kind(params, lr=cfg.lr)

    return factory
