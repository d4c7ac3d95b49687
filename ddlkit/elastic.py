"""Elastic runs: each attempt's process group, faults per attempt, resuming a
run folder, and the layout a live resize switches to.

Attempts. When a rank dies (or hangs) and ``max_restarts`` allows, the kernel
ends every rank and starts all of them again (as torchrun does), attempt n+1,
from the newest valid checkpoint. All attempts meet at the kernel's one
rendezvous store, but in torch 2.13 ranks under an agent store all use the
same keys (``default_pg/...``): a restarted rank would read the dead attempt's
addresses and fail to connect ("Connection refused") or hang. So every attempt
joins its group under its own ``PrefixStore("/attempt_<n>", store)``
(FIELD-NOTES: 10/10 clean restarts that way), with a timeout.

Resizing. ``Run.relaunch(world_size=...)`` keeps the GLOBAL batch
(``batch_size * world_size`` for single/data) constant, so every step sees the
same samples (``ShardedStream`` is a pure function of the step and the global
batch) and takes the same optimizer step: the loss curve continues as if
nothing happened, which is what makes "no step lost" checkable.
"""
from __future__ import annotations

import os
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch.distributed as dist

from . import checkpoint
from .config import RunConfig

# Strategies whose data-parallel size is the world size (the others: their module
# must say, e.g. world_size // pipeline stages).
WHOLE_REPLICA = ("single", "data")


def attempt_number() -> int:
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def join_attempt_group(device: str, timeout: timedelta) -> None:
    """Initialise this rank's default process group under the attempt's own
    store prefix (accelerate then uses it as it is). Only under ddlkit's or
    torchrun's agent store, with more than one rank."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size < 2 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or dist.is_initialized():
        return
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=timeout)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", timeout=timeout, world_size=world_size,
                            rank=int(os.environ["RANK"]), store=dist.PrefixStore(f"/attempt_{attempt_number()}", store))


def faults_for(cfg: RunConfig, rank: int, attempt: int) -> dict[int, str]:
    """{step: kind} of the faults this rank injects in this attempt."""
    return {int(f["step"]): f["kind"] for f in fault_list(cfg) if f["rank"] == rank and f.get("attempt", 0) == attempt}


def fault_list(cfg: RunConfig) -> list[dict[str, Any]]:
    """``fault`` may be one fault or a list of them."""
    return cfg.fault if isinstance(cfg.fault, list) else [cfg.fault] if cfg.fault else []


def find_resume_point(run_path: Path) -> checkpoint.Found:
    """The newest valid checkpoint of a run folder, or one ValueError saying why none."""
    if not (Path(run_path) / "run.json").exists():
        raise ValueError(f"resume={str(run_path)!r} is invalid: it is not a run folder (no run.json in it)")
    found = checkpoint.latest(checkpoint.folder_of(run_path))
    if found is None:
        raise ValueError(f"resume={str(run_path)!r} is invalid: it has no valid checkpoint in "
                         f"{checkpoint.folder_of(run_path)} (set checkpoint_every to write them)")
    return found


def resume_folder(resume: str | os.PathLike) -> Path:
    """The run folder to resume, checked before anything starts."""
    path = Path(resume)
    if not (path / "run.json").is_file() or not (path / "config.json").is_file():
        raise ValueError(f"resume={str(resume)!r} is invalid: it is not the folder of a built-in run "
                         "(runs/<id>/ with run.json and config.json)")
    return path


def continue_run(path: Path, world_size: int, echo: bool | Callable[[str], None]):
    """A Run for the resumed folder that already holds its old events, the
    ``restart`` event that announces the new attempt, and the checkpoint it
    starts from. Says which checkpoints it skipped and why."""
    from .run import Run, load_run

    found = find_resume_point(path)
    saved_by = found.manifest.get("world_size")
    if found.manifest.get("layout") == "sharded" and saved_by != world_size:
        raise ValueError(f"world_size={world_size} is invalid for resuming {found.path}: it holds shards of "
                         f"{saved_by} ranks (a sharded checkpoint resumes with the same layout)")
    old = load_run(path)
    attempt = max((e.get("attempt", 0) for e in old.events), default=0) + 1
    run = Run(old.id, path, world_size, old.started,
              meta={k: old.meta[k] for k in ("target", "device") if k in old.meta})
    run._add(old.events)
    say = (lambda line: print(line, flush=True)) if echo is True else (echo or (lambda line: None))
    for line in [*found.skipped, f"resuming run {old.id} from {found.path.name} (step {found.step}), attempt {attempt}"]:
        say(f"ddlkit: {line}")
    announce = [{"type": "restart", "time": time.time(), "attempt": attempt, "reason": "resume",
                 "from_step": found.step, "checkpoint": found.path.name, "skipped": found.skipped}]
    return run, announce, found.path


def resized(cfg: RunConfig, world_size: int | None = None, strategy: str | None = None) -> RunConfig:
    """The config after a live resize: same global batch, same everything else.
    Faults aimed at ranks that no longer exist are dropped."""
    world_size = cfg.world_size if world_size is None else world_size
    if strategy is None:  # a single process that grows becomes data parallel
        strategy = "data" if cfg.strategy == "single" and world_size != 1 else cfg.strategy
    for name in {cfg.strategy, strategy}:
        if name not in WHOLE_REPLICA:
            raise ValueError(f"strategy={name!r} cannot be resized live yet: live resizing keeps the global batch, "
                             f"and knows the data-parallel size of {list(WHOLE_REPLICA)} only")
    global_batch = cfg.batch_size * cfg.world_size
    if not isinstance(world_size, int) or world_size < 1 or global_batch % world_size:
        raise ValueError(f"world_size={world_size!r} is invalid for a resize: the global batch of {global_batch} "
                         f"samples must split evenly over the ranks")
    kept = [f for f in fault_list(cfg) if f["rank"] < world_size] or None
    new = cfg.replace(world_size=world_size, strategy=strategy, batch_size=global_batch // world_size, fault=kept)
    new.validate()
    return new


class Restarts:
    """The collector's side: when the ranks of an attempt have all ended,
    whether to start the next attempt, from which checkpoint, with which layout.
    A failure restarts at most ``max_restarts`` times; a new layout
    (``Run.relaunch``) always gets its attempt. Each attempt's ranks get the
    same start-up allowance before their first step, so none can hang."""

    def __init__(self, collector, starter, attempt: int, announce: list[dict[str, Any]]):
        self.collector = collector
        self.starter = starter
        self.attempt = attempt
        self.announce = announce  # recorded first, by the collector's thread
        config = getattr(starter, "config", None)
        self.max_restarts = config.max_restarts if config is not None else 0
        self.used = 0
        self.new_config: RunConfig | None = None  # set by Run.relaunch
        self.stopped_early = False  # rank 0 reported it stopped before its last step

    def left(self) -> bool:
        return self.used < self.max_restarts and not self.collector.stop_requested

    def next_attempt(self) -> bool:
        """Start the next attempt if one is due; False when the run is over."""
        from .supervise import culprit

        c = self.collector
        failed = any(r.failed for r in c.ranks)
        new_layout = self.new_config is not None and (failed or self.stopped_early)
        if c.stop_requested or not (new_layout or failed and self.left()):
            return False
        c._end_ranks()
        found = checkpoint.latest(checkpoint.folder_of(c.run.path))
        from_step = found.step if found else 0
        self.attempt += 1
        event: dict[str, Any] = {"time": time.time(), "attempt": self.attempt, "from_step": from_step,
                                 "checkpoint": found.path.name if found else None,
                                 "skipped": found.skipped if found else []}
        if new_layout:
            config = self.new_config
            event.update(type="layout", strategy=config.strategy, world_size=config.world_size,
                         batch_size=config.batch_size)
        else:
            self.used += 1
            config = self.starter.config
            first = culprit(c.ranks)  # named first; a hang is detected on whichever rank waited longest
            failed = sorted((r for r in c.ranks if r.failed), key=lambda r: r is not first)
            event.update(type="restart", reason="; ".join(f"rank {r.rank}: {r.describe()}" for r in failed))
        for line in event["skipped"]:
            c._emit_note(line)
        c.run._record([event])
        self.new_config, self.stopped_early = None, False
        c.controls.pop("stop", None)  # the stop that ended the old layout is not for the new one
        ranks, outputs = self.starter.start(config.world_size, self.attempt, found.path if found else None, config)
        c.run._add_pids([r.process.pid for r in ranks])
        c._adopt(ranks, outputs)
        return True
