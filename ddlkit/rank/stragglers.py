"""Slow ranks on purpose, to study stragglers and load imbalance.

Three knobs of ``RunConfig``, applied after a rank's work in each step:

- ``slowdown={rank: factor}``: the step's work (with the delays below) takes
  ``factor`` times as long. It is the initial value of
  the live ``slowdown`` control: ``run.control(slowdown={1: 1.0})`` heals rank 1.
- ``delay_s={rank: seconds}``: a fixed pause per step, a scripted schedule that
  makes arrival orders predictable (the staleness tests use it).
- ``delay_jitter_s``: a random pause per step on every rank, exponential with
  this mean, seeded by the run's seed and the rank (reproducible noise).
"""

from __future__ import annotations

import random
import time

from ..config import RunConfig
from ..controls import Controls
from .reporter import Reporter


class Straggler:
    """One rank's pauses.

    >>> straggler = Straggler(RunConfig(delay_s={0: 0.01}), rank=0, reporter=None)
    >>> round(straggler.delay(Controls(slowdown={0: 3.0}), time.perf_counter()), 2)  # 3 x 0.01 s of work
    0.03
    """

    def __init__(self, cfg: RunConfig, rank: int, reporter: Reporter | None) -> None:
        self.rank = rank
        self.fixed_s = float((cfg.delay_s or {}).get(rank, 0.0))
        self.jitter_s = float(cfg.delay_jitter_s)
        self.random = random.Random(f"{cfg.seed}/{rank}")
        if cfg.slowdown and reporter is not None:
            reporter.preset_controls(slowdown=dict(cfg.slowdown))

    def delay(self, live: Controls, work_started: float) -> float:
        """Pause as this rank's stragglers say; returns the seconds paused."""
        elapsed = time.perf_counter() - work_started
        work = elapsed + self.fixed_s + (self.random.expovariate(1 / self.jitter_s) if self.jitter_s else 0.0)
        pause = work * live.slowdown_of(self.rank) - elapsed  # the factor scales the scripted delays too
        if pause > 0:
            time.sleep(pause)
        return max(pause, 0.0)
