"""The Run: what the kernel holds of one training run.

Live, it is fed by its collector thread; finished, it is its folder
``runs/<id>/``: ``run.json`` (what was launched), ``events.jsonl`` (every event,
appended as it arrives, so a crash or an interrupt loses nothing recorded),
``rank<r>.log`` (each rank's output), ``summary.json`` and, for built-in
experiments, ``config.json`` and ``final_state.pt``. ``load_run`` reads the
folder back into the same table.
"""
from __future__ import annotations

import atexit
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Callable

import pandas as pd

if TYPE_CHECKING:
    from .channel import ChannelServer
    from .collector import Collector
    from .supervise import RankState

LIVE = ("starting", "running")
_live_runs: set["Run"] = set()
_live_lock = threading.Lock()


class RunFailed(RuntimeError):
    """A rank raised, died or hung. The message names every rank's exit and
    carries the first real traceback (not a peer's 'connection reset')."""

    def __init__(self, message: str, run_id: str):
        super().__init__(message)
        self.run_id = run_id


@dataclass
class Result:
    state_dict: dict[str, Any] | None  # full model state on CPU (built-in experiments)
    summary: dict[str, Any]
    returns: dict[int, Any] = field(default_factory=dict)  # what each rank's function returned, if anything


class Run:
    """One run. Created by :func:`ddlkit.launch` or :func:`load_run`.

    >>> import ddlkit
    >>> run = ddlkit.launch(ddlkit.RunConfig(strategy="single", world_size=1, steps=3), echo=False)
    >>> run.wait(120).status, len(run.metrics)
    ('done', 3)
    """

    def __init__(self, run_id: str, path: Path, world_size: int, started: float, meta: dict[str, Any]):
        self.id = run_id
        self.path = Path(path)
        self.world_size = world_size
        self.started = started
        self.meta = meta
        self.events: list[dict[str, Any]] = []  # every event but heartbeats, as received
        self._rows: list[dict[str, Any]] = []  # step events: the metrics table
        self.steps_done = 0  # highest logged step + 1, over all ranks
        self._table: tuple[int, pd.DataFrame] | None = None
        self._status = "starting"
        self._error: str | None = None
        self.summary: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._ended = threading.Event()
        self._collector: "Collector | None" = None
        self.pids: list[int] = []  # worker processes (each leads its own process group)
        self.ports: list[int] = []  # the rendezvous store's and the channel's, on 127.0.0.1
        self._log: IO[str] | None = None

    # ---- public -----------------------------------------------------------
    @property
    def status(self) -> str:
        """'starting' | 'running' | 'done' | 'failed' | 'stopped'."""
        return self._status

    @property
    def error(self) -> str | None:
        """Why the run failed (every rank's exit and the first real traceback)."""
        return self._error

    @property
    def metrics(self) -> pd.DataFrame:
        """One row per (rank, logged step); ``time`` is seconds since launch."""
        with self._lock:
            rows = self._rows
            if self._table is None or self._table[0] != len(rows):
                self._table = (len(rows), pd.DataFrame(rows, columns=_columns(rows)))
            return self._table[1]

    def wait(self, timeout: float | None = None) -> "Run":
        """Block until the run ends. Raises :class:`RunFailed` if it failed and
        ``TimeoutError`` if it is still going after ``timeout`` seconds (it keeps
        going). An interrupt (Ctrl-C, Jupyter's stop button) stops the run."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            # Short slices: a SIGINT that lands on another thread of the kernel
            # is only noticed when the main thread wakes.
            while not self._ended.wait(0.1):
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"run {self.id} is still {self.status} after {timeout} s")
        except KeyboardInterrupt:
            self.stop()
            raise
        if self._status == "failed":
            raise RunFailed(self._error or f"run {self.id} failed", self.id)
        return self

    def stop(self, timeout: float = 10.0) -> "Run":
        """End the run; it ends 'stopped' (never 'done'), keeping everything
        recorded so far. A built-in experiment's ranks stop together at a step
        and save their state; any rank still running after 3 s (and a
        function's ranks at once) is killed."""
        if self._collector is not None and not self._ended.is_set():
            if self.meta.get("target") == "config":
                self._collector.send_control({"stop": True})
                self._collector.graceful_stop = True
            self._collector.stop_requested = True
            self._ended.wait(timeout)
        return self

    def control(self, **changes: Any) -> None:
        """Change a running built-in experiment; every rank applies the change
        at the same step, within about 0.1 s of training.

        ``lr=0.01``, ``paused=True`` / ``False``, ``slowdown={1: 3.0}`` (rank 1
        takes three times as long per step; ``{1: 1}`` to undo).
        """
        from .control import check

        check(changes)
        for rank in changes.get("slowdown", {}):
            if not 0 <= rank < self.world_size:
                raise ValueError(f"slowdown rank {rank} is invalid: valid ranks are 0..{self.world_size - 1}")
        if self.meta.get("target") != "config":
            raise RuntimeError("live controls act on built-in experiments (a RunConfig), not on a launched function")
        if self._collector is None or self._ended.is_set():
            raise RuntimeError(f"run {self.id} is {self.status}: there is nothing to control")
        self._collector.send_control(changes)

    def relaunch(self, world_size: int | None = None, strategy: str | None = None) -> None:
        """Change the parallel layout of a running built-in experiment: the ranks
        stop together at a step and checkpoint it, and the same run goes on from
        that step with ``world_size`` ranks of ``strategy``. The global batch
        stays the same (``batch_size`` per rank is rescaled), so the loss curve
        continues; a ``layout`` event marks the step. Needs ``checkpoint_every``.

        >>> import ddlkit
        >>> cfg = ddlkit.RunConfig(strategy="data", world_size=2, steps=400, checkpoint_every=50)
        >>> run = ddlkit.launch(cfg, echo=False)
        >>> run.relaunch(world_size=1)
        >>> run.wait(300).world_size
        1
        """
        from .elastic import resized

        if self.meta.get("target") != "config":
            raise RuntimeError("relaunch acts on built-in experiments (a RunConfig), not on a launched function")
        if self._collector is None or self._ended.is_set():
            raise RuntimeError(f"run {self.id} is {self.status}: there is nothing to relaunch")
        restarts = self._collector.restarts
        if restarts.starter.config.checkpoint_every is None:
            raise ValueError("relaunch needs checkpoints: launch the run with checkpoint_every set")
        restarts.new_config = resized(restarts.starter.config, world_size, strategy)
        self._collector.send_control({"stop": True})

    def set_lr(self, lr: float) -> None:
        self.control(lr=lr)

    def pause(self) -> None:
        self.control(paused=True)

    def resume(self) -> None:
        self.control(paused=False)

    def result(self) -> Result:
        """The final model state (full, on CPU), the summary, and what each
        rank's function returned."""
        import torch

        if self._status in LIVE:
            raise RuntimeError(f"run {self.id} is still {self._status}: call run.wait() first")
        if self._status == "failed":
            raise RunFailed(self._error or f"run {self.id} failed", self.id)
        if self._status == "stopped":
            raise RuntimeError(f"run {self.id} was stopped before it finished: it has metrics but no result")
        state_path = self.path / "final_state.pt"
        state = torch.load(state_path, weights_only=True) if state_path.exists() else None
        returns = {int(p.stem.removeprefix("return-rank")): torch.load(p, weights_only=True)
                   for p in sorted(self.path.glob("return-rank*.pt"))}
        return Result(state, self.summary, returns)

    def report(self, path: str | os.PathLike) -> Path:
        """Write the run's panels as a standalone HTML page."""
        from .figures import write_report

        return write_report(self, path)

    def __repr__(self) -> str:
        return f"<ddlkit.Run {self.id} {self.status}: {len(self._rows)} rows, {self.world_size} ranks>"

    # ---- fed by the launcher and the collector ---------------------------
    def _supervise(self, ranks: list["RankState"], outputs: dict[int, IO[bytes]], server: "ChannelServer",
                   rendezvous: Any, hang_timeout: float | None, echo: bool | Callable[[str], None],
                   **attempts: Any) -> None:
        from .collector import Collector

        self.ports = [rendezvous.port, server.address[1]]
        self._add_pids([state.process.pid for state in ranks])
        self._log = open(self.path / "events.jsonl", "a")
        self._collector = Collector(self, ranks, outputs, server, rendezvous, hang_timeout, echo, **attempts)
        with _live_lock:
            _live_runs.add(self)
        self._collector.start()

    def _add_pids(self, pids: list[int]) -> None:
        """Every worker of every attempt, so that all of them can be checked gone."""
        self.pids += pids
        _write_json(self.path / "run.json", {"id": self.id, "started": self.started, "world_size": self.world_size,
                                             "pids": self.pids, "ports": self.ports, **self.meta})

    def _record(self, events: list[dict[str, Any]]) -> None:
        """Called by the collector thread, and by the kernel's thread for control requests."""
        lines = "".join(json.dumps(event) + "\n" for event in events)
        with self._lock:
            self._add(events)
            if self._log is not None:
                self._log.write(lines)
                self._log.flush()

    def _add(self, events: list[dict[str, Any]]) -> None:
        self.events.extend(events)
        for event in events:
            if event.get("type") in ("restart", "layout"):
                self._supersede(event)
            if event.get("type") == "step":
                row = {k: v for k, v in event.items() if k != "type"}
                row["time"] = event["time"] - self.started
                self._rows.append(row)
                self.steps_done = max(self.steps_done, row["step"] + 1)

    def _supersede(self, event: dict[str, Any]) -> None:
        """A new attempt redoes the steps from its checkpoint on: the rows the
        old attempt logged for them leave ``metrics`` (they stay in ``events``,
        where the steps redone can be counted), so the loss curve is one line."""
        self._rows = [row for row in self._rows if row["step"] < event["from_step"]]
        self.steps_done = max((row["step"] + 1 for row in self._rows), default=0)
        self._table = None
        if event["type"] == "layout":
            self.world_size = event["world_size"]

    def _set_status(self, status: str) -> None:
        if self._status in LIVE:
            self._status = status

    def _finish(self, status: str, error: str | None) -> None:
        self._error = error
        self.summary = self._summarise(status, time.time())
        _write_json(self.path / "summary.json", self.summary)
        with self._lock:
            if self._log is not None:
                self._log.close()
                self._log = None
        self._status = status
        with _live_lock:
            _live_runs.discard(self)
        self._ended.set()

    def _summarise(self, status: str, ended: float) -> dict[str, Any]:
        finished = [e for e in self.events if e.get("type") == "finished"]
        rank0 = next((e for e in reversed(finished) if e["rank"] == 0), {})  # the last attempt's
        table = self.metrics
        summary: dict[str, Any] = {"run_id": self.id, "status": status, "world_size": self.world_size,
                                   "wall_s": round(ended - self.started, 3)}
        if not table.empty:
            summary["steps"] = int(table["step"].max()) + 1
            if "loss" in table:
                last = table.sort_values("step").groupby("rank")["loss"].last()
                summary["final_loss"] = float(last.mean())
        if "samples" in rank0 and rank0.get("train_s"):
            summary.update(samples=rank0["samples"], train_s=round(rank0["train_s"], 3),
                           samples_per_s=round(rank0["samples"] / rank0["train_s"], 1))
        if self._error:
            summary["error"] = self._error
        return summary


def load_run(path: str | os.PathLike) -> Run:
    """Read a run's folder back: the same metrics table, events and summary.

    Works for runs launched by ddlkit (``events.jsonl``) and for ranks started
    by another launcher, which each wrote ``events-rank<r>.jsonl``.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a run folder (expected runs/<id>/)")
    meta = json.loads((path / "run.json").read_text()) if (path / "run.json").exists() else {}
    events = []
    for log in [path / "events.jsonl"] if (path / "events.jsonl").exists() else sorted(path.glob("events-rank*.jsonl")):
        events += [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    events = [e for e in events if e.get("type") != "beat"]
    if "started" not in meta:
        events.sort(key=lambda e: e["time"])
    started = meta.get("started", events[0]["time"] if events else 0.0)
    world_size = meta.get("world_size", len({e["rank"] for e in events if "rank" in e}))
    run = Run(meta.get("id", path.name), path, world_size, started, meta)
    run._add(events)
    summary_path = path / "summary.json"
    if summary_path.exists():
        run.summary = json.loads(summary_path.read_text())
        run._status, run._error = run.summary["status"], run.summary.get("error")
    else:  # the kernel that ran it ended first, or another launcher ran it
        ranks_done = {e["rank"] for e in events if e.get("type") == "finished"}
        run._status = "done" if ranks_done and len(ranks_done) == world_size else "stopped"
        run.summary = run._summarise(run._status, events[-1]["time"] if events else started)
    run._ended.set()
    return run


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    first = ["rank", "step", "time", "loss"]
    seen = dict.fromkeys(k for row in rows for k in row)
    return [c for c in first if c in seen] + [c for c in seen if c not in first]


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


@atexit.register
def _stop_live_runs() -> None:
    """A kernel that exits takes its runs with it (workers also watch their parent)."""
    with _live_lock:
        runs = list(_live_runs)
    for run in runs:
        run.stop(timeout=5.0)
