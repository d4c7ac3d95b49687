"""Going on with a run: resuming its folder, and the layout a relaunch switches to.

Resuming. ``launch(resume="runs/<id>")`` continues a run folder (its events,
its id, attempt numbers that go on) from its newest valid checkpoint.

Relaunching. ``Run.relaunch(world_size=..., strategy=...)`` keeps the GLOBAL
batch (``batch_size`` times the data-parallel size the strategy's spec gives)
constant, so every step sees the same samples (``ShardedStream`` is a pure
function of the step and the global batch) and takes the same optimizer step:
the loss curve continues as if nothing happened, which is what makes "no step
lost" checkable.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import checkpoint, events, registry
from ..config import RunConfig
from .records import load_run
from .run import Run


def rows_arrived_until(run: Run, cfg: RunConfig) -> int | None:
    """The first step whose row some rank never delivered (a rank killed before
    it sent its last rows loses them). A new attempt must start there or earlier,
    or ``run.metrics`` keeps a hole: steps of a newer checkpoint are never redone.

    Counted in logged steps (every ``log_every``) since the layout began; the
    ranks that must have rows are every rank of a lockstep strategy, else those
    that log rows at all (None: no rank does).

    >>> run = Run.from_events([{"type": "step", "rank": r, "step": s, "time": 0.0} for r in (0, 1) for s in range(6)])
    >>> rows_arrived_until(run, RunConfig(world_size=2)), rows_arrived_until(run, RunConfig(world_size=3))
    (6, 0)
    """
    rows = run.metrics
    steps = {rank: set(group["step"]) for rank, group in rows.groupby("rank")} if not rows.empty else {}
    ranks = range(cfg.world_size) if registry.get(cfg.strategy).lockstep else sorted(steps)
    layout_start = next((e["from_step"] for e in reversed(run.events) if e.get("type") == "layout"), 0)
    first = layout_start + (-layout_start) % cfg.log_every  # the layout's first logged step

    def first_missing(logged: set[int]) -> int:
        step = first
        while step in logged:
            step += cfg.log_every
        return step

    return min((first_missing(steps.get(rank, set())) for rank in ranks), default=None)


def find_resume_point(run_path: Path, rows_until: int | None = None) -> checkpoint.Found:
    """The newest valid checkpoint of a run folder (at most at step ``rows_until``),
    or one ValueError saying why there is none."""
    if not (Path(run_path) / "run.json").exists():
        raise ValueError(f"resume={str(run_path)!r} is invalid: it is not a run folder (no run.json in it)")
    found = checkpoint.latest(checkpoint.folder_of(run_path), rows_until, rows_missing(rows_until))
    if found is None:
        raise ValueError(
            f"resume={str(run_path)!r} is invalid: it has no valid checkpoint in "
            f"{checkpoint.folder_of(run_path)} (set checkpoint_every to write them)"
        )
    return found


def resume_folder(resume: str | os.PathLike[str]) -> Path:
    """The run folder to resume, checked before anything starts."""
    path = Path(resume)
    if not (path / "run.json").is_file() or not (path / "config.json").is_file():
        raise ValueError(
            f"resume={str(resume)!r} is invalid: it is not the folder of a built-in run "
            "(runs/<id>/ with run.json and config.json)"
        )
    return path


def continue_run(path: Path, world_size: int, say: Callable[[str], None]) -> tuple[Run, list[events.Restart], Path]:
    """A Run for the resumed folder that already holds its old events, the
    ``restart`` event that announces the new attempt, and the checkpoint it
    starts from. Says which checkpoints it skipped and why."""
    found = find_resume_point(path)  # none at all: that is the error to give
    old = load_run(path)
    until = rows_arrived_until(old, RunConfig.load(path / "config.json"))
    if until is not None and found.step > until:  # some rank's rows before it never arrived
        found = find_resume_point(path, until)
    saved_by = found.manifest.get("world_size")
    if found.manifest.get("layout") == "sharded" and saved_by != world_size:
        raise ValueError(
            f"world_size={world_size} is invalid for resuming {found.path}: it holds shards of "
            f"{saved_by} ranks (a sharded checkpoint resumes with the same layout)"
        )
    attempt = max((e.get("attempt", 0) for e in old.events), default=0) + 1
    run = Run(
        old.id, path, world_size, old.started, meta={k: old.meta[k] for k in ("target", "device") if k in old.meta}
    )
    run.record(old.events)
    for line in [
        *found.skipped,
        f"resuming run {old.id} from {found.path.name} (step {found.step}), attempt {attempt}",
    ]:
        say(f"ddlkit: {line}")
    announce = [
        events.Restart(
            type="restart",
            time=time.time(),
            attempt=attempt,
            reason="resume",
            from_step=found.step,
            checkpoint=found.path.name,
            skipped=found.skipped,
        )
    ]
    return run, announce, found.path


def resized(
    cfg: RunConfig, world_size: int | None = None, strategy: str | None = None, knobs: dict[str, Any] | None = None
) -> RunConfig:
    """The config after a relaunch: the same global batch, the same everything
    else the new strategy reads (with ``knobs`` changed). Faults and stragglers
    aimed at ranks that no longer exist are dropped.

    >>> new = resized(RunConfig(strategy="data", world_size=2, batch_size=8, delay_s={1: 0.1}), 2, "pipeline")
    >>> new.pp, new.batch_size, new.delay_s  # one replica now takes the whole global batch of 16
    (2, 16, {1: 0.1})
    """
    world_size = cfg.world_size if world_size is None else world_size
    if strategy is None:  # a single process that grows becomes data parallel
        strategy = "data" if cfg.strategy == "single" and world_size != 1 else cfg.strategy
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise ValueError(f"world_size={world_size!r} is invalid for a relaunch: it must be a positive integer")
    global_batch = cfg.batch_size * registry.get(cfg.strategy).dp_size(cfg)
    kept = [f for f in cfg.faults() if f["rank"] < world_size] or None
    stragglers = {
        name: {rank: value for rank, value in (getattr(cfg, name) or {}).items() if rank < world_size} or None
        for name in ("slowdown", "delay_s")
    }
    new = cfg.for_strategy(strategy).replace(world_size=world_size, fault=kept, **stragglers, **(knobs or {}))
    replicas = registry.get(strategy).dp_size(new)
    if global_batch % replicas:
        raise ValueError(
            f"world_size={world_size} is invalid for a relaunch: the global batch of {global_batch} "
            f"samples must split evenly over {replicas} data-parallel replicas"
        )
    new = new.replace(batch_size=global_batch // replicas)
    new.validate()
    return new


def rows_missing(rows_until: int | None) -> str:
    """Why a checkpoint past ``rows_until`` is not used."""
    return f"the rows of step {rows_until} never arrived from every rank; resuming later would leave them out"
