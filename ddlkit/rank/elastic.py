"""What a rank started by another launcher (torchrun, accelerate launch, a
Slurm job) does itself that ddlkit's kernel does otherwise.

- **The run's record**: rank 0 writes ``run.json`` (id, start time, world
  size), which ``ddlkit.follow`` and ``load_run`` read.
- **Restarts**: ``torchrun --max-restarts`` starts every rank again after a
  failure (attempt n+1, ``TORCHELASTIC_RESTART_COUNT``). The new attempt
  resumes from the newest valid checkpoint of the same run folder, and rank 0
  writes the ``restart`` marker the kernel writes for its own runs. An error
  event says ``restarting`` while the launcher has restarts left, so a
  follower does not call the run failed.
- **Steering**: a follower (``ddlkit.follow(...).set_lr(...)``) writes
  ``control.json`` in the run folder; rank 0 polls it and hands the changes
  to its reporter as if they came over the kernel's channel, so the ranks
  agree on them through ``ddlkit.rank.sync`` as for any run. The file is
  trusted because of where it is: the run folder is this user's and private
  (0700, ``ddlkit.files``), and a control file not owned by this user, or
  writable by anyone else, is ignored.
"""

from __future__ import annotations

import json
import os
import stat
import threading
import time
from pathlib import Path

from .. import checkpoint, events
from ..controls import CONTROL_FILE
from ..files import write_json
from .faults import attempt_number
from .reporter import Reporter

POLL_S = 0.2


def restarts_left() -> int:
    """How many more times the launcher will restart the ranks after a failure."""
    return max(int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) - attempt_number(), 0)


def describe_run(run_dir: Path, rank: int) -> None:
    """Rank 0 writes ``run.json`` once (a restarted attempt keeps the first)."""
    if rank == 0 and not (run_dir / "run.json").exists():
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        launcher = "torchrun" if "TORCHELASTIC_RUN_ID" in os.environ else "another launcher"
        meta = {"id": run_dir.name, "started": time.time(), "world_size": world_size, "target": "config"}
        write_json(run_dir / "run.json", {**meta, "launcher": launcher, "pids": [], "ports": []})


def resume_after_restart(run_dir: Path, rank: int, reporter: Reporter) -> None:
    """In a restarted attempt: resume from the newest valid checkpoint
    (``DDLKIT_RESUME``, as the kernel sets it), and rank 0 marks the restart."""
    attempt = attempt_number()
    if attempt == 0 or os.environ.get("DDLKIT_RESUME"):
        return
    found = checkpoint.latest(checkpoint.folder_of(run_dir))
    if found is not None:
        os.environ["DDLKIT_RESUME"] = str(found.path)
    if rank == 0:
        marker = events.Restart(
            type="restart",
            attempt=attempt,
            reason=f"the launcher restarted every rank (attempt {attempt})",
            from_step=found.step if found else 0,
            checkpoint=found.path.name if found else None,
            skipped=found.skipped if found else [],
        )
        reporter.send(marker, now=True)


def watch_control_file(run_dir: Path, reporter: Reporter, poll_s: float = POLL_S) -> threading.Thread:
    """Rank 0's poller of ``control.json`` (a daemon thread)."""
    thread = threading.Thread(
        target=_watch, args=(run_dir / CONTROL_FILE, reporter, poll_s), name="ddlkit-control-file", daemon=True
    )
    thread.start()
    return thread


def read_control_file(path: Path) -> dict | None:
    """The file's changes, or None if it is missing, not this user's, writable by others, or not whole."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if info.st_uid != os.geteuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return None
        try:
            changes = json.loads(f.read())
        except ValueError:
            return None
    return changes if isinstance(changes, dict) else None


def _watch(path: Path, reporter: Reporter, poll_s: float) -> None:
    seen = 0
    while True:
        changes = read_control_file(path)
        sequence = changes.pop("sequence", 0) if changes else 0
        if changes and isinstance(sequence, int) and sequence > seen:
            seen = sequence
            reporter.apply_control(changes)
        time.sleep(poll_s)
