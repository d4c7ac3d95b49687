"""Slow ranks on purpose, to study stragglers and load imbalance.

A rank's persistent speed (``speeds``, ``rank_profile``: ``ddlkit.speeds``)
and three knobs of ``RunConfig``, applied after a rank's work in each step:

- ``slowdown={rank: factor}``: the step's work (with the delays below) takes
  ``factor`` times as long. It is the initial value of
  the live ``slowdown`` control: ``run.control(slowdown={1: 1.0})`` heals rank 1.
- ``delay_s={rank: seconds}``: a fixed pause per step, a scripted schedule that
  makes arrival orders predictable (the staleness tests use it).
- ``delay_jitter_s``: a random pause per step on every rank, exponential with
  this mean, seeded by the run's seed and the rank (reproducible noise).

A rank at speed ``s`` with slowdown ``f`` takes ``f / s`` times as long.
Where the pause falls: after the step (the rank loop), or where the strategy
says (``RankContext.straggle``): a parameter-server worker before it sends
its gradient, a data-parallel rank at its first gradient bucket, so that
there the factor scales its compute (batch, forward, backward) and its
gradient reaches the all-reduce late, as a slow device's would.
"""

from __future__ import annotations

import random
import time

from ..config import RunConfig
from ..controls import Controls
from ..speeds import rank_speeds
from .reporter import Reporter


class Straggler:
    """One rank's pauses.

    >>> straggler = Straggler(RunConfig(delay_s={0: 0.01}), rank=0, reporter=None)
    >>> round(straggler.delay(Controls(slowdown={0: 3.0}), time.perf_counter()), 2)  # 3 x 0.01 s of work
    0.03
    >>> half = Straggler(RunConfig(world_size=2, speeds={0: 0.5}, delay_s={0: 0.01}), rank=0, reporter=None)
    >>> round(half.delay(Controls(), time.perf_counter()), 2)  # at half speed 0.01 s of work takes 0.02 s
    0.02
    """

    def __init__(self, cfg: RunConfig, rank: int, reporter: Reporter | None) -> None:
        self.rank = rank
        self.fixed_s = float((cfg.delay_s or {}).get(rank, 0.0))
        self.jitter_s = float(cfg.delay_jitter_s)
        self.random = random.Random(f"{cfg.seed}/{rank}")
        self.speed = rank_speeds(cfg.speeds, cfg.rank_profile, cfg.world_size, cfg.seed)[rank]
        if cfg.slowdown and reporter is not None:
            reporter.preset_controls(slowdown=dict(cfg.slowdown))

    def delay(self, live: Controls, work_started: float, simulated_s: float = 0.0) -> float:
        """Pause as this rank's stragglers say, ``simulated_s`` of simulated work
        included; returns the seconds paused."""
        elapsed = time.perf_counter() - work_started
        work = (
            elapsed
            + simulated_s
            + self.fixed_s
            + (self.random.expovariate(1 / self.jitter_s) if self.jitter_s else 0.0)
        )
        pause = work * live.slowdown_of(self.rank) / self.speed - elapsed  # the factor scales the scripted delays too
        if pause > 0:
            time.sleep(pause)
        return max(pause, 0.0)
