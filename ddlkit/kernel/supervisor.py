"""The supervisor: one background thread per run that carries the ranks'
events into the Run and its folder, and supervises the ranks: a failed or
hung rank ends the run (or, with ``max_restarts``, restarts every rank from
the newest checkpoint), a relaunch starts the next attempt in a new layout,
and when the run ends no worker process and no port is left.

It is the Run's driver: ``Run.stop``, ``.control``, ``.relaunch`` call its namesakes.
"""

from __future__ import annotations

import atexit
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from .. import controls, registry
from .hangs import dump_stacks_if_hung
from .intake import Arrival, Intake
from .ranks import RankState, failure_report, kill_group, wait_gone
from .records import RecordError, RunLog, remove_unfinished
from .restarts import Restarts
from .run import Run
from .starter import Starter

FAILURE_GRACE_S = 2.0  # after a first failure, time for the other ranks to report theirs
RESTART_GRACE_S = 0.5  # the same, when the ranks will be restarted (their failure is recorded by then)
STACK_DUMP_S = 1.0  # after a hang, time for the ranks to print their stacks
DRAIN_S = 2.0  # after the last exit, longest wait for output still in flight
GRACEFUL_STOP_S = 3.0  # after asking the ranks to stop, how long before they are killed
RELAUNCH_STOP_S = 30.0  # the same, before a new layout: losing the stop checkpoint would redo steps
SELECT_S = 0.1

_live: set[Supervisor] = set()
_live_lock = threading.Lock()


class Supervisor:
    def __init__(
        self,
        run: Run,
        starter: Starter,
        hang_timeout: float | None,
        echo: Callable[[str], None] | None,
        restarts: Restarts,
    ):
        self.run = run
        self.starter = starter
        self.hang_timeout = hang_timeout
        self.log = RunLog(run)
        self.intake = Intake(starter.server, run.path, echo)
        self.intake.on_connect = self._connected
        self.restarts = restarts
        self.stop_requested = False
        self.graceful_stop = False  # the ranks were asked to stop at a step; kill only if they do not
        self.kill_at: float | None = None
        self.controls: dict[str, Any] = {}  # the state every rank should have: sent again to late joiners
        self.ranks: list[RankState] = []
        self.pending: tuple[int, int, Path | None] | None = None  # the first attempt, if not started yet
        self.thread = threading.Thread(target=self._loop, name=f"ddlkit-supervisor-{run.id}", daemon=True)

    def begin(self, world_size: int, attempt: int, checkpoint: Path | None) -> None:
        """Start the first attempt's ranks and supervise them; if that fails, nothing is left running.
        While the warm starter preloads (a kernel's first run), the supervisor's thread starts them."""
        if not self.starter.ready():
            self.pending = (world_size, attempt, checkpoint)
            return self.start([], {})  # run.json is written now: a folder that cannot be written fails here
        try:
            ranks, outputs = self.starter.start(world_size, attempt, checkpoint)
        except BaseException:
            self._close()
            raise
        self.start(ranks, outputs)

    def start(self, ranks: list[RankState], outputs: dict[int, IO[bytes]]) -> None:
        rendezvous = self.starter.rendezvous
        self.run.ports = [rendezvous.port, self.starter.server.address[1], *rendezvous.private_ports]
        try:
            self._adopt(ranks, outputs)
        except BaseException:  # e.g. run.json cannot be written: nothing may be left running
            self.ranks = ranks
            self._close()
            raise
        self.run.attach(self)
        with _live_lock:
            _live.add(self)
        self.thread.start()

    # ---- the Run's driver (called from the kernel's thread) -------------------
    def stop(self) -> None:
        if self.run.is_config:  # the ranks stop together at a step and save it
            self.control({"stop": True})
            self.graceful_stop = True
        self.stop_requested = True

    def control(self, changes: dict[str, Any]) -> None:
        config = self.restarts.config
        controls.check(changes, [k for k in registry.get(config.strategy).knobs if k.live] if config else [])
        for rank in changes.get("slowdown", {}):
            if not 0 <= rank < self.run.world_size:
                raise ValueError(f"slowdown rank {rank} is invalid: valid ranks are 0..{self.run.world_size - 1}")
        if changes.get("paused") is False:  # time spent paused is not a hang
            for state in self.ranks:
                state.progress_at = time.time()
        self.controls.update(changes)
        self.log.append([{"type": "control_request", "time": time.time(), **controls.to_json(changes)}])
        self.intake.send({"type": "control", **controls.to_json(changes)})

    def relaunch(self, world_size: int | None, strategy: str | None, knobs: dict[str, Any]) -> None:
        self.restarts.new_layout(world_size, strategy, knobs)
        self.control({"stop": True, "save": True})  # the ranks stop together at a step and checkpoint it

    # ---- the loop ---------------------------------------------------------------
    def _loop(self) -> None:
        problem = None  # why the run failed for a reason of the kernel's own, not a rank's
        try:
            self._supervise_until_over()
        except (RecordError, OSError) as exc:  # disk full, folder removed: nothing more can be recorded
            problem = f"run {self.run.id} failed: {exc}; every rank was ended, as nothing more could be recorded"
        except BaseException:  # a bug here must still end the workers
            problem = f"run {self.run.id}: ddlkit's supervisor failed:\n{traceback.format_exc()}"
        cleanup_errors = self._close()
        try:
            status, error = self._verdict(problem, cleanup_errors)
            self._finish(status, error)
        finally:  # whatever happened, the run has a final status and wait() returns
            self.run.end()
            with _live_lock:
                _live.discard(self)

    def _supervise_until_over(self) -> None:
        all_exited_at = None
        self.log.append([dict(event) for event in self.restarts.announce])
        if self.pending is not None and not self.stop_requested:
            self._adopt(*self.starter.start(*self.pending))
        while True:
            arrived = self.intake.poll(SELECT_S)
            if arrived:
                self.log.append(self._handle(arrived))
            now = time.time()
            self._supervise(now)
            if all(r.returncode is not None for r in self.ranks):
                all_exited_at = all_exited_at or now
                if self.intake.drained or now - all_exited_at > DRAIN_S:
                    if not self._next_attempt():
                        return
                    all_exited_at = None

    def _close(self) -> list[str]:
        """End the ranks, remove what they left half-written, close the ports;
        each step runs even if one before it failed. Returns what failed."""
        failed = []
        for step in (
            self._end_ranks,
            lambda: remove_unfinished(self.run.path),
            self.intake.close,
            self.starter.close,
        ):
            try:
                step()
            except Exception:
                failed.append(traceback.format_exc())
        return failed

    def _finish(self, status: str, error: str | None) -> None:
        """The final status and summary, in the Run and in ``summary.json``."""
        try:
            self.log.close(self.run.finish(status, error))
        except RecordError as exc:  # the run is over, but its folder does not say so
            self.run.finish("failed", "\n".join(filter(None, [error, f"run {self.run.id}: {exc}"])))

    def _next_attempt(self) -> bool:
        """Start the next attempt if one is due; False when the run is over."""
        if self.stop_requested:
            return False
        self._read_outputs()
        attempt = self.restarts.next(self.ranks)
        if attempt is None:
            return False
        self._end_ranks()
        for line in attempt.event["skipped"]:
            self.intake.say(line)
        self.log.append([dict(attempt.event)])
        for name in ("stop", "save"):  # the stop that ended the old layout is not for the new one
            self.controls.pop(name, None)
        ranks, outputs = self.starter.start(
            attempt.config.world_size, attempt.number, attempt.checkpoint, attempt.config
        )
        self._adopt(ranks, outputs)
        return True

    def _adopt(self, ranks: list[RankState], outputs: dict[int, IO[bytes]]) -> None:
        self.ranks = ranks
        self.kill_at = None
        self.run.pids += [state.process.pid for state in ranks]
        self.log.write_meta()  # every worker of every attempt, so that all of them can be checked gone
        self.intake.adopt(len(ranks), outputs)

    def _verdict(self, problem: str | None, cleanup_errors: list[str]) -> tuple[str, str | None]:
        self._read_outputs()
        if cleanup_errors:
            problem = "\n".join(filter(None, [problem, "ddlkit failed while ending the run:", *cleanup_errors]))
        if problem:
            own = any(r.failed and not r.killed_by_ddlkit for r in self.ranks)  # a rank failed of itself too
            ranks = failure_report(self.run.id, self.ranks) if own else None
            return "failed", "\n".join(filter(None, [problem, ranks]))
        if self.stop_requested:
            return "stopped", None
        if any(r.failed for r in self.ranks):
            return "failed", failure_report(self.run.id, self.ranks)
        return "done", None

    def _read_outputs(self) -> None:
        for state in self.ranks:
            state.read_output(list(self.intake.tails.get(state.rank, ())))

    # ---- what the ranks say ---------------------------------------------------------
    def _connected(self, rank: int) -> None:
        self.ranks[rank].connected = True
        if self.controls:  # changes made before this rank connected
            # In a later attempt they were applied (and marked) before: they are in force from its start.
            replay = {"replay": True} if self.restarts.attempt > 0 else {}
            self.intake.send({"type": "control", **replay, **controls.to_json(self.controls)}, rank=rank)
        if all(r.connected for r in self.ranks):
            self.run.set_running()

    def _handle(self, arrived: list[Arrival]) -> list[dict[str, Any]]:
        """Progress, tracebacks and ends of the ranks; the events to record."""
        recorded, now = [], time.time()
        for rank, event in arrived:
            state = self.ranks[rank]
            event["rank"] = rank  # a rank speaks only for itself
            state.heard_at = now
            step = event.get("step")
            if isinstance(step, int) and step > state.last_step:
                state.last_step, state.progress_at = step, now
            kind = event.get("type")
            if kind == "beat":
                state.waiting = bool(event.get("waiting"))
                if event.get("started") and not state.started:  # the hang timeout runs from here
                    state.started, state.progress_at = True, max(state.progress_at, now)
                continue
            if kind == "error":
                state.traceback, state.error_at = event.get("traceback", ""), event.get("time", time.time())
                self.intake.keep(rank, state.traceback)
            elif kind == "finished":
                state.finished = True
                self.restarts.stopped_early = self.restarts.stopped_early or bool(event.get("stopped"))
            event["attempt"] = self.restarts.attempt
            recorded.append(event)
        return recorded

    # ---- supervision ------------------------------------------------------------
    def _supervise(self, now: float) -> None:
        for state in self.ranks:
            if state.returncode is None and state.process.poll() is not None:
                state.returncode, state.ended_at = state.process.poll(), now
        if self.kill_at is None:
            if self.stop_requested:
                self.kill_at = now + (GRACEFUL_STOP_S if self.graceful_stop else 0.0)
            elif any(r.failed for r in self.ranks):
                self.kill_at = now + (RESTART_GRACE_S if self.restarts.left() else FAILURE_GRACE_S)
            elif self.restarts.relaunching:  # the ranks stop at a step and save it: give them time
                self.kill_at = now + RELAUNCH_STOP_S
            elif self.hang_timeout is not None and not self.controls.get("paused"):
                if dump_stacks_if_hung(self.ranks, now, self.hang_timeout):
                    self.kill_at = now + STACK_DUMP_S  # time to print the stacks
        if self.kill_at is not None and now >= self.kill_at:
            for state in self.ranks:
                if state.returncode is None:
                    self._kill(state)

    def _kill(self, state: RankState) -> None:
        """SIGKILL a rank's whole process group; if it was still running, ddlkit ended it."""
        if state.returncode is None and state.process.poll() is None:
            state.ended_by_ddlkit = True
        kill_group(state.process.pid)

    def _end_ranks(self) -> None:
        """Kill what is left of this attempt's ranks and close what connects to them."""
        for state in self.ranks:  # every group before waiting: no rank may see a peer die and exit by itself
            self._kill(state)  # also reaches anything a worker started
        deadline = time.time() + 5.0
        for state in self.ranks:
            wait_gone(state.process, max(deadline - time.time(), 0.0))
            if state.returncode is None:
                state.returncode, state.ended_at = state.process.poll(), time.time()
        self.intake.end_attempt()


@atexit.register
def _stop_live_runs() -> None:
    """A kernel that exits takes its runs with it (workers also watch their parent)."""
    with _live_lock:
        runs = [supervisor.run for supervisor in _live]
    for run in runs:
        run.stop(timeout=5.0)
