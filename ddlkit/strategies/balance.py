"""Balancing data parallelism: uneven shares of a constant global batch.

With one slow rank every synchronous peer waits for it at each all-reduce.
A balancer gives each rank a share of the global batch in proportion to its
speed, so all ranks reach the all-reduce together:

- ``balance="static"``: shares from the declared speeds (``speeds``,
  ``rank_profile``) from the first step; with none declared, measured over
  the first ``balance_every`` steps, then kept.
- ``balance="dynamic"``: re-measured every ``balance_every`` steps and
  re-shared, so a rank that slows down mid-run (the live ``slowdown``
  control) is given less.

A rank's speed is its samples per second of *busy* time (the step's work up
to its first gradient bucket: reading the batch, forward, backward, its
straggler pause; no idle), the median over the steps since the last re-share
(the first ``WARM_UP`` steps of a run, slow with one-time set-up, are left out),
averaged with the previous estimate, so that one noisy window moves the
shares only half-way (a lasting change is followed within a few re-shares).
At a re-share step every rank all-gathers the speeds and computes the same
shares from them (``ddlkit.data.split_batch``), so all switch at the same
step, and each sends a ``balance`` event. The global batch stays the same, so
every sample is still used exactly once per epoch; each rank's mean loss is
scaled by ``share * ranks / global batch`` before DDP's mean all-reduce, so
the update is the one a single process makes on the whole global batch.
"""

from __future__ import annotations

import statistics

import torch
import torch.distributed as dist

from .. import events
from ..config import RunConfig
from ..data import split_batch
from ..knobs import choice, integer
from ..rank.strategy import RankContext
from ..speeds import declared, rank_speeds

MODES = ("none", "static", "dynamic")
WARM_UP = 2  # steps whose speed is not measured: lazy set-up, and the step whose memory is measured
KNOBS = (
    choice(
        "balance",
        "none",
        MODES,
        "balance",
        "share each global batch by rank speed: static (declared or measured once) or dynamic (re-measured)",
    ),
    integer("balance_every", 10, 1, "balance every", "steps between speed measurements of balance='dynamic'"),
)


class Balancer:
    """One rank's view of the shares; every rank calls the same methods at the same steps."""

    def __init__(self, cfg: RunConfig, dp_rank: int, dp_size: int) -> None:
        self.mode, self.every, self.steps = cfg.balance, cfg.balance_every, cfg.steps
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.global_batch = cfg.batch_size * cfg.grad_accumulation * dp_size  # a step's samples, all micro-batches
        self.by_declared = self.mode != "none" and declared(cfg)
        weights = rank_speeds(cfg.speeds, cfg.rank_profile, dp_size, cfg.seed) if self.by_declared else [1.0] * dp_size
        self.shares = split_batch(self.global_batch, weights)
        self.rates: list[float] = []  # samples per busy second, each step since the last re-share
        self.estimate: list[float] | None = None  # every rank's speed, smoothed over the re-shares

    def scale(self, samples: int) -> float:
        """The factor on this rank's mean loss that makes DDP's mean the global batch's mean."""
        return samples * self.dp_size / self.global_batch

    def start(self, ctx: RankContext) -> None:
        """Before the first step: the initial shares (announced if uneven)."""
        ctx.shard.set_shares(self.shares)
        if self.by_declared:
            self._announce(ctx, 0, [])

    def after(self, ctx: RankContext, step: int, samples: int, busy_s: float) -> None:
        """After ``step``: add its measure; re-share for the next step when due."""
        if self.mode == "none" or self.dp_size == 1:
            return
        if step >= WARM_UP and busy_s > 0:
            self.rates.append(samples / busy_s)
        upcoming = step + 1
        due = upcoming % self.every == 0 if self.mode == "dynamic" else upcoming == self.every
        if not due or upcoming >= self.steps or (self.mode == "static" and self.by_declared):
            return
        mine = torch.tensor([statistics.median(self.rates) if self.rates else 0.0], dtype=torch.float64)
        gathered = [torch.zeros(1, dtype=torch.float64) for _ in range(self.dp_size)]
        dist.all_gather(gathered, mine)
        speeds = [float(t.item()) for t in gathered]  # the same numbers on every rank: the same shares
        self.rates = []
        if min(speeds) <= 0:  # a window of warm-up steps only: nothing measured yet
            return
        if self.estimate is not None:  # half the old estimate: one noisy window (a busy machine) moves shares half-way
            speeds = [(old + new) / 2 for old, new in zip(self.estimate, speeds, strict=True)]
        self.estimate = speeds
        self.shares = split_batch(self.global_batch, speeds)
        ctx.shard.set_shares(self.shares)
        self._announce(ctx, upcoming, speeds)

    def _announce(self, ctx: RankContext, step: int, speeds: list[float]) -> None:
        ctx.reporter.send(
            events.Balance(
                type="balance", step=step, share=self.shares[self.dp_rank], shares=self.shares, speeds=speeds
            )
        )
