"""Following a run that another launcher runs (torchrun, accelerate launch, a
Slurm job): a live, read-only :class:`Run` over its folder.

Ranks started without ddlkit's kernel append their events to
``runs/<id>/events-rank<r>.jsonl`` (``ddlkit.rank.reporter``). A follower
thread tails every such file as it grows, feeding new events to the Run
through the same ``record()`` path the supervisor uses, so ``run.metrics``
and ``Dashboard(run)`` update live:

- only complete lines are read; a partial last line waits for its end, so
  no event is cut in two, and a byte is read once, so none is counted twice;
- a file that appears late (a node that joins later) is read from its start;
- a line that is not JSON (a rank killed in the middle of a write) is skipped
  and counted in ``skipped_lines``.

Status: ``done`` when every rank of the last attempt finished, ``stopped`` if
they finished early on a stop, ``failed`` when a rank wrote an error and its
launcher has no restart left, or when no rank wrote anything for
``silent_s`` seconds (its heartbeats, once a second, stopped: the job is
gone). Steering writes the control file that rank 0 polls
(``ddlkit.rank.steering``): ``run.set_lr``, ``pause``, ``resume``, ``stop``,
``control``.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from .. import controls, registry
from ..config import RunConfig
from ..controls import CONTROL_FILE
from ..files import write_json
from .run import Run

POLL_S = 0.25
SILENT_S = 60.0
META_WAIT_S = 10.0  # how long follow() waits for rank 0's run.json in a folder just made


class RankLogs:
    """The complete lines of a folder's ``events-rank<r>.jsonl`` files, each read once.

    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> log = folder / "events-rank0.jsonl"
    >>> _ = log.write_text('{"rank": 0, "time": 1.0, "type": "beat", "step": 0}\\n{"rank": 0, "ti')
    >>> logs = RankLogs(folder)
    >>> [e["type"] for e in logs.read()], logs.read()
    (['beat'], [])
    >>> with log.open("a") as f:
    ...     _ = f.write('me": 2.0, "type": "finished"}\\n')
    >>> [e["type"] for e in logs.read()]
    ['finished']
    """

    def __init__(self, folder: Path):
        self.folder = folder
        self.offsets: dict[str, int] = {}  # bytes read of each file
        self.partial: dict[str, bytes] = {}  # a last line not ended yet
        self.skipped_lines = 0

    def read(self) -> list[dict[str, Any]]:
        """The events of every line completed since the last call, in time order."""
        events: list[dict[str, Any]] = []
        for path in sorted(self.folder.glob("events-rank*.jsonl")):
            with open(path, "rb") as f:
                f.seek(self.offsets.get(path.name, 0))
                data = f.read()
            if not data:
                continue
            self.offsets[path.name] = self.offsets.get(path.name, 0) + len(data)
            *lines, rest = (self.partial.pop(path.name, b"") + data).split(b"\n")
            if rest:
                self.partial[path.name] = rest
            events.extend(self._parse(line) for line in lines if line.strip())
        return sorted((e for e in events if e), key=lambda e: e.get("time", 0.0))

    def _parse(self, line: bytes) -> dict[str, Any]:
        try:
            event = json.loads(line)
        except ValueError:
            event = None
        if not isinstance(event, dict):
            self.skipped_lines += 1
            return {}
        return event


def status_of(events: list[dict[str, Any]], world_size: int) -> tuple[str | None, str | None]:
    """(final status or None while the run goes on, error) from a rank-written run's events.

    >>> status_of([{"type": "finished", "rank": 0}, {"type": "finished", "rank": 1}], 2)
    ('done', None)
    >>> status_of([{"type": "error", "rank": 1, "traceback": "boom", "restarting": True}], 2)
    (None, None)
    """
    last_attempt = max((i for i, e in enumerate(events) if e.get("type") in ("restart", "layout")), default=-1)
    current = events[last_attempt + 1 :]
    errors = [e for e in current if e.get("type") == "error" and not e.get("restarting")]
    if errors:
        return "failed", f"rank {errors[0].get('rank')} failed:\n{errors[0].get('traceback', '')}"
    finished = {e["rank"]: e for e in current if e.get("type") == "finished"}
    if world_size and len(finished) >= world_size:
        return ("stopped" if finished.get(0, {}).get("stopped") else "done"), None
    return None, None


def read_meta(folder: Path) -> dict[str, Any]:
    """What rank 0 wrote in ``run.json``; a folder that has only a config.json holds a built-in experiment."""
    meta = json.loads((folder / "run.json").read_text()) if (folder / "run.json").exists() else {}
    if "target" not in meta and (folder / "config.json").exists():
        meta["target"] = "config"
    return meta


class Follower:
    """The thread that tails a folder into a Run, and the Run's driver: its
    controls go to the control file."""

    def __init__(self, run: Run, poll_s: float, silent_s: float):
        self.run = run
        self.logs = RankLogs(run.path)
        self.poll_s = poll_s
        self.silent_s = silent_s
        self.controls: dict[str, Any] = {}  # every change so far: the control file holds them all
        self.sequence = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._follow, name=f"ddlkit-follow-{run.id}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    # ---- the Driver protocol ------------------------------------------------
    def control(self, changes: dict[str, Any]) -> None:
        cfg = self._experiment()
        controls.check(changes, [k for k in registry.get(cfg.strategy).knobs if k.live] if cfg else [])
        with self._lock:
            self.sequence += 1
            self.controls = {**self.controls, **controls.to_json(changes)}
            write_json(self.run.path / CONTROL_FILE, {"sequence": self.sequence, **self.controls})

    def stop(self) -> None:
        self.control({"stop": True})

    def relaunch(self, world_size: int | None, strategy: str | None, knobs: dict[str, Any]) -> None:
        raise RuntimeError(f"run {self.run.id} was started by another launcher: its layout is the launcher's to change")

    # ---- the thread -----------------------------------------------------------
    def _experiment(self) -> RunConfig | None:
        path = self.run.path / "config.json"
        return RunConfig.load(path) if path.exists() else None

    def _follow(self) -> None:
        heard = time.monotonic()
        while True:
            new = self.logs.read()
            if new:
                heard = time.monotonic()
                self._take_meta(new)
                self.run.record([e for e in new if e.get("type") != "beat"])
                self.run.set_running()
            status, error = status_of(self.run.events, self.run.world_size)
            if status is None and time.monotonic() - heard > self.silent_s:
                status, error = "failed", f"no rank of run {self.run.id} wrote anything for {self.silent_s:g} s"
            if status is not None:
                self.run.finish(status, error)
                self.run.end()
                return
            time.sleep(self.poll_s)

    def _take_meta(self, new: list[dict[str, Any]]) -> None:
        """The world size and start time rank 0 wrote, once they are there;
        without them, the first event's time is the start."""
        if self.run.world_size:
            return
        meta = read_meta(self.run.path)
        self.run.meta.update(meta)
        self.run.world_size = int(meta.get("world_size", 0))
        if not self.run.events:
            self.run.started = float(meta.get("started", new[0].get("time", self.run.started)))


def follow(path: str | os.PathLike[str], poll_s: float = POLL_S, silent_s: float = SILENT_S) -> Run:
    """A live, read-only Run over the folder ``path`` that ranks started by
    another launcher are writing; it updates every ``poll_s`` seconds until
    the run ends. In a folder made a moment ago it first waits (up to 10 s)
    for rank 0's ``run.json``.

    Example (a run started from a terminal with ``torchrun ... -m ddlkit.worker
    exp.yaml --rdzv-id job-7``)::

        run = ddlkit.follow("runs/job-7")
        ddlkit.Dashboard(run)        # draws live
        run.set_lr(0.01)             # rank 0 reads it from runs/job-7/control.json
        run.wait(600).status         # 'done'
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a run folder (expected runs/<id>/, written by the ranks)")
    if (folder / "events.jsonl").exists():
        raise ValueError(f"{folder} was written by ddlkit.launch, not by ranks of another launcher: use load_run")
    if poll_s <= 0 or silent_s <= 0:
        raise ValueError(f"poll_s={poll_s} and silent_s={silent_s} must be positive numbers of seconds")
    deadline = time.monotonic() + min(silent_s, META_WAIT_S)
    while not (folder / "run.json").exists() and time.monotonic() < deadline:  # the folder made, rank 0 not yet there
        time.sleep(poll_s)
    meta = read_meta(folder)
    run = Run(folder.name, folder, int(meta.get("world_size", 0)), float(meta.get("started", time.time())), meta)
    follower = Follower(run, poll_s, silent_s)
    run.attach(follower)
    follower.start()
    return run
