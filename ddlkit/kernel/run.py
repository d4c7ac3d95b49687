"""The Run: what the kernel holds of one training run, a plain record.

Live, its supervisor (``ddlkit.kernel.supervisor``) feeds it events and
steers the ranks for it; finished, it is its folder ``runs/<id>/``
(``ddlkit.kernel.records``): ``run.json`` (what was launched),
``events.jsonl`` (every event, appended as it arrives, so a crash or an
interrupt loses nothing recorded), ``rank<r>.log`` (each rank's output),
``summary.json`` and, for built-in experiments, ``config.json`` and
``final_state.pt``.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Protocol

import pandas as pd
import torch

from .outcomes import Result, RunFailed, RunInterrupted

__all__ = ["Run", "RunFailed", "RunInterrupted", "Result", "LIVE"]
LIVE = ("starting", "running")


class Driver(Protocol):
    """What a live Run asks of its supervisor."""

    def stop(self) -> None: ...
    def control(self, changes: dict[str, Any]) -> None: ...
    def relaunch(self, world_size: int | None, strategy: str | None, knobs: dict[str, Any]) -> None: ...


class Run:
    """One run. Created by :func:`ddlkit.launch`, :func:`ddlkit.load_run` or
    :meth:`from_events`.

    >>> run = Run.from_events([{"type": "step", "rank": 0, "step": 0, "time": 10.5, "loss": 2.0}], started=10.0)
    >>> run.status, run.metrics[["time", "loss"]].values.tolist()
    ('done', [[0.5, 2.0]])
    """

    def __init__(self, run_id: str, path: Path, world_size: int, started: float, meta: dict[str, Any]):
        self.id = run_id
        self.path = Path(path)
        self.world_size = world_size
        self.started = started
        self.meta = meta  # what was launched: {"target": "config" or a function's name, "device": ...}
        self.events: list[dict[str, Any]] = []  # every event but heartbeats, as received
        self.steps_done = 0  # highest logged step + 1, over all ranks
        self.summary: dict[str, Any] = {}
        self.pids: list[int] = []  # worker processes (each leads its own process group)
        self.ports: list[int] = []  # the rendezvous store's, the channel's, and the store's private one; 127.0.0.1
        self._rows: list[dict[str, Any]] = []  # step events: the metrics table
        self._table: tuple[int, pd.DataFrame] | None = None
        self._status = "starting"
        self._error: str | None = None
        self._lock = threading.Lock()
        self._ended = threading.Event()
        self._driver: Driver | None = None

    @classmethod
    def from_events(
        cls,
        events: list[dict[str, Any]],
        started: float = 0.0,
        world_size: int | None = None,
        status: str = "done",
        run_id: str = "events",
        path: Path = Path("."),
        meta: dict[str, Any] | None = None,
    ) -> Run:
        """A Run holding ``events`` (tests, benchmarks, folders written by other launchers)."""
        ranks = {e["rank"] for e in events if "rank" in e}
        run = cls(run_id, path, world_size if world_size is not None else len(ranks), started, meta or {})
        run.record(events)
        run._status = status
        if status not in LIVE:
            run._ended.set()
        return run

    # ---- reading ----------------------------------------------------------
    @property
    def status(self) -> str:
        """'starting' | 'running' | 'done' | 'failed' | 'stopped'."""
        return self._status

    @property
    def error(self) -> str | None:
        """Why the run failed (every rank's exit and the first real traceback)."""
        return self._error

    @property
    def live(self) -> bool:
        return self._status in LIVE

    @property
    def is_config(self) -> bool:
        """A built-in experiment (a RunConfig), not a launched function."""
        return self.meta.get("target") == "config"

    @property
    def metrics(self) -> pd.DataFrame:
        """One row per (rank, logged step); ``time`` is seconds since launch."""
        with self._lock:
            rows = self._rows
            if self._table is None or self._table[0] != len(rows):
                self._table = (len(rows), pd.DataFrame(rows, columns=_columns(rows)))
            return self._table[1]

    def wait(self, timeout: float | None = None) -> Run:
        """Block until the run ends. Raises :class:`RunFailed` if it failed and
        ``TimeoutError`` if it is still going after ``timeout`` seconds (it keeps
        going). An interrupt (Ctrl-C, Jupyter's stop button) stops the run (its
        ranks stop at a step; everything recorded stays) and raises
        :class:`RunInterrupted`, which a notebook shows as one line."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            # Short slices: a SIGINT that lands on another thread of the kernel
            # is only noticed when the main thread wakes.
            while not self._ended.wait(0.1):
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"run {self.id} is still {self.status} after {timeout} s")
        except KeyboardInterrupt:
            self.stop()
            raise RunInterrupted(
                f"run {self.id} was stopped by the interrupt at step {self.steps_done}; "
                f"what it recorded is in run.metrics, run.events and {self.path}"
            ) from None
        if self._status == "failed":
            raise RunFailed(self._error or f"run {self.id} failed", self.id)
        return self

    def result(self) -> Result:
        """The final model state (full, on CPU), the summary, and what each
        rank's function returned."""
        if self.live:
            raise RuntimeError(f"run {self.id} is still {self._status}: call run.wait() first")
        if self._status == "failed":
            raise RunFailed(self._error or f"run {self.id} failed", self.id)
        if self._status == "stopped":
            raise RuntimeError(f"run {self.id} was stopped before it finished: it has metrics but no result")
        state_path = self.path / "final_state.pt"
        state = torch.load(state_path, weights_only=True) if state_path.exists() else None
        returns = {
            int(p.stem.removeprefix("return-rank")): torch.load(p, weights_only=True)
            for p in sorted(self.path.glob("return-rank*.pt"))
        }
        return Result(state, self.summary, returns)

    # ---- steering (delegated to the supervisor) ------------------------------
    def stop(self, timeout: float = 10.0) -> Run:
        """End the run; it ends 'stopped' (never 'done'), keeping everything
        recorded so far. A built-in experiment's ranks stop together at a step
        (and checkpoint it, with ``checkpoint_every``); any rank still running
        after 3 s (and a function's ranks at once) is killed."""
        if self._driver is not None and not self._ended.is_set():
            self._driver.stop()
            self._ended.wait(timeout)
        return self

    def control(self, **changes: Any) -> None:
        """Change a running built-in experiment; every rank applies the change
        at the same step, within about 0.1 s of training.

        ``lr=0.01``, ``paused=True`` / ``False``, ``slowdown={1: 3.0}`` (rank 1
        takes three times as long per step; ``{1: 1}`` to undo), and the live
        knobs of the run's strategy (e.g. a federated run's ``fraction``).
        Raises ValueError for a control or value that is not valid.
        """
        self._live_driver("live controls").control(changes)

    def relaunch(self, world_size: int | None = None, strategy: str | None = None, **knobs: Any) -> None:
        """Change the layout of a running built-in experiment, now: the ranks stop
        together at a step and checkpoint it (whole, by single-process names), and
        the run goes on from there as ``world_size`` ranks of ``strategy`` (with its
        ``knobs``, e.g. ``micro_batches=8``) and the same global batch; a ``layout``
        event marks the step. Any of single, data, pipeline, tensor, fsdp, hybrid
        goes on as any other. Raises ValueError, before anything stops, if the
        layout cannot work. Example::

            run.relaunch(world_size=2, strategy="pipeline")
        """
        self._live_driver("relaunch").relaunch(world_size, strategy, knobs)

    @property
    def strategy(self) -> str | None:
        """The strategy the run's ranks run now (a built-in experiment's; after a relaunch, the new one)."""
        strategy = self.meta.get("strategy")
        return strategy if isinstance(strategy, str) else None

    def set_lr(self, lr: float) -> None:
        self.control(lr=lr)

    def pause(self) -> None:
        self.control(paused=True)

    def resume(self) -> None:
        self.control(paused=False)

    def _live_driver(self, what: str) -> Driver:
        if not self.is_config:
            raise RuntimeError(f"{what} act on built-in experiments (a RunConfig), not on a launched function")
        if self._driver is None or self._ended.is_set():
            raise RuntimeError(f"run {self.id} is {self.status}: there is nothing to control")
        return self._driver

    def __repr__(self) -> str:
        return f"<ddlkit.Run {self.id} {self.status}: {len(self._rows)} rows, {self.world_size} ranks>"

    # ---- fed by the supervisor and the loaders -----------------------------------
    def attach(self, driver: Driver) -> None:
        """The supervisor that steers this run while it is live."""
        self._driver = driver

    def record(self, events: list[dict[str, Any]]) -> None:
        """Add events (in arrival order): step events become rows; a restart or
        layout event supersedes the rows of the steps the new attempt redoes."""
        with self._lock:
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
            self.meta["strategy"] = event["strategy"]

    def set_running(self) -> None:
        if self._status == "starting":
            self._status = "running"

    def finish(self, status: str, error: str | None) -> dict[str, Any]:
        """The final status, error and summary (returned, to be written before :meth:`end`)."""
        self._error = error
        self.summary = self.summarise(status, time.time())
        self._status = status
        return self.summary

    def end(self) -> None:
        """The run is over and its folder complete: ``wait()`` returns."""
        self._ended.set()

    def summarise(self, status: str, ended: float) -> dict[str, Any]:
        """Status, wall time, steps, final loss and throughput, from the events."""
        finished = [e for e in self.events if e.get("type") == "finished"]
        rank0: dict[str, Any] = next((e for e in reversed(finished) if e["rank"] == 0), {})  # the last attempt's
        table = self.metrics
        summary: dict[str, Any] = {
            "run_id": self.id,
            "status": status,
            "world_size": self.world_size,
            "wall_s": round(ended - self.started, 3),
        }
        if not table.empty:
            summary["steps"] = int(table["step"].max()) + 1
            if "loss" in table:
                last = table.sort_values("step").groupby("rank")["loss"].last()
                summary["final_loss"] = float(last.mean())
        if "samples" in rank0 and rank0.get("train_s"):
            summary.update(
                samples=rank0["samples"],
                train_s=round(rank0["train_s"], 3),
                samples_per_s=round(rank0["samples"] / rank0["train_s"], 1),
            )
        if self._error:
            summary["error"] = self._error
        return summary

    def restore(self, summary: dict[str, Any]) -> None:
        """The status, error and summary of a finished run read back from its folder."""
        self.summary, self._status, self._error = summary, summary["status"], summary.get("error")
        self._ended.set()


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    first = ["rank", "step", "time", "loss"]
    seen = dict.fromkeys(k for row in rows for k in row)
    return [c for c in first if c in seen] + [c for c in seen if c not in first]
