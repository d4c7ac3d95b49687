"""The restart policy: when the ranks of an attempt have all ended, whether to
start the next attempt, from which checkpoint, in which layout.

A failure restarts at most ``max_restarts`` times; a new layout
(``Run.relaunch``) always gets its attempt. Each attempt starts from the
newest valid checkpoint of the run folder (or step 0 without one) that is not
past a step whose rows some rank never delivered.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import checkpoint, events, registry
from ..config import RunConfig
from .ranks import RankState, culprit
from .resume import resized, rows_arrived_until, rows_missing
from .run import Run


@dataclass
class Attempt:
    """The next attempt: its number, config, checkpoint and announcing event."""

    number: int
    config: RunConfig
    checkpoint: Path | None
    event: events.Layout | events.Restart


class Restarts:
    def __init__(
        self, run: Run, config: RunConfig | None, attempt: int = 0, announce: list[events.Restart] | None = None
    ):
        self.run = run
        self.config = config  # the current attempt's (None: a launched function)
        self.attempt = attempt
        self.announce = announce or []  # recorded first, by the supervisor's thread
        self.max_restarts = config.max_restarts if config is not None else 0
        self.used = 0
        self.new_config: RunConfig | None = None  # set by a relaunch
        self.stopped_early = False  # rank 0 reported it stopped before its last step

    @property
    def relaunching(self) -> bool:
        return self.new_config is not None

    def left(self) -> bool:
        return self.used < self.max_restarts

    def new_layout(self, world_size: int | None, strategy: str | None, knobs: dict[str, Any]) -> None:
        """The layout of the next attempt (the current ranks are then asked to
        stop at a step and checkpoint it; the new layout loads that checkpoint)."""
        if self.config is None:
            raise RuntimeError("relaunch acts on built-in experiments (a RunConfig), not on a launched function")
        new = resized(self.config, world_size, strategy, knobs)
        able = [name for name in registry.names() if registry.get(name).portable]
        if not registry.get(self.config.strategy).portable:
            raise ValueError(
                f"a run of strategy={self.config.strategy!r} cannot change its layout live: its ranks do not "
                f"save a whole checkpoint to go on from (runs of {able} can)"
            )
        if not registry.get(new.strategy).portable:
            raise ValueError(
                f"strategy={new.strategy!r} is invalid for a relaunch: it cannot go on from the run's "
                f"checkpoint (valid: {able})"
            )
        self.new_config = new

    def next(self, ranks: list[RankState]) -> Attempt | None:
        """The next attempt if one is due (the ranks of this one have all ended), else None."""
        failed = any(r.failed for r in ranks)
        new_layout = self.new_config is not None and (failed or self.stopped_early)
        if self.config is None or not (new_layout or failed and self.left()):
            return None
        # No later than the first step whose rows did not all arrive: those steps are redone, not lost.
        until = rows_arrived_until(self.run, self.config)
        found = checkpoint.latest(checkpoint.folder_of(self.run.path), until, rows_missing(until))
        self.attempt += 1
        now, from_step = time.time(), found.step if found else 0
        name, skipped = (found.path.name, found.skipped) if found else (None, [])
        event: events.Layout | events.Restart
        if new_layout and self.new_config is not None:
            self.config = self.new_config
            event = events.Layout(
                type="layout",
                time=now,
                attempt=self.attempt,
                strategy=self.config.strategy,
                world_size=self.config.world_size,
                batch_size=self.config.batch_size,
                from_step=from_step,
                checkpoint=name,
                skipped=skipped,
            )
        else:
            self.used += 1
            first = culprit(ranks)  # named first; a hang is detected on whichever rank waited longest
            failing = sorted((r for r in ranks if r.failed), key=lambda r: r is not first)
            reason = "; ".join(f"rank {r.rank}: {r.describe()}" for r in failing)
            event = events.Restart(
                type="restart",
                time=now,
                attempt=self.attempt,
                reason=reason,
                from_step=from_step,
                checkpoint=name,
                skipped=skipped,
            )
        self.new_config, self.stopped_early = None, False
        return Attempt(self.attempt, self.config, found.path if found else None, event)
