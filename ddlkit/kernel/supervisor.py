"""The supervisor: one background thread per run that carries the ranks'
events into the Run and its folder, and supervises the ranks: a failed or
hung rank ends the run (or, with ``max_restarts``, restarts every rank from
the newest checkpoint), a relaunch starts the next attempt in a new layout,
and when the run ends no worker process and no port is left.

It is the Run's driver: ``Run.stop``, ``Run.control`` and ``Run.relaunch``
call :meth:`Supervisor.stop`, :meth:`control` and :meth:`relaunch`.
"""

from __future__ import annotations

import atexit
import signal
import threading
import time
import traceback
from collections.abc import Callable
from typing import IO, Any

from .. import controls, registry
from .intake import Arrival, Intake
from .ranks import RankState, failure_report, kill_group, signal_process
from .records import RunLog
from .restarts import Restarts
from .run import Run
from .starter import Starter

FAILURE_GRACE_S = 2.0  # after a first failure, time for the other ranks to report theirs
RESTART_GRACE_S = 0.5  # the same, when the ranks will be restarted (their failure is recorded by then)
STARTUP_GRACE_S = 60.0  # the least time a rank gets to make its first step
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
        self.thread = threading.Thread(target=self._loop, name=f"ddlkit-supervisor-{run.id}", daemon=True)

    def start(self, ranks: list[RankState], outputs: dict[int, IO[bytes]]) -> None:
        rendezvous = self.starter.rendezvous
        self.run.ports = [rendezvous.port, self.starter.server.address[1], *rendezvous.private_ports]
        self._adopt(ranks, outputs)
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
        internal_error = None
        try:
            all_exited_at = None
            self.log.append([dict(event) for event in self.restarts.announce])
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
                            break
                        all_exited_at = None
        except BaseException:  # a bug here must still end the workers
            internal_error = traceback.format_exc()
        finally:
            self._end_ranks()
            self.intake.close()
            self.starter.close()
        status, error = self._verdict(internal_error)
        try:
            self.log.close(self.run.finish(status, error))
        finally:
            self.run.end()
            with _live_lock:
                _live.discard(self)

    def _next_attempt(self) -> bool:
        """Start the next attempt if one is due; False when the run is over."""
        if self.stop_requested:
            return False
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

    def _verdict(self, internal_error: str | None) -> tuple[str, str | None]:
        for state in self.ranks:
            state.output_tail = list(self.intake.tails.get(state.rank, ()))
        if internal_error:
            return "failed", f"run {self.run.id}: ddlkit's supervisor failed:\n{internal_error}"
        if self.stop_requested:
            return "stopped", None
        if any(r.failed for r in self.ranks):
            return "failed", failure_report(self.run.id, self.ranks)
        return "done", None

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
        recorded = []
        for rank, event in arrived:
            state = self.ranks[rank]
            event["rank"] = rank  # a rank speaks only for itself
            step = event.get("step")
            if isinstance(step, int) and step > state.last_step:
                state.last_step, state.progress_at = step, time.time()
            kind = event.get("type")
            if kind == "beat":
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
            else:
                self._detect_hang(now)
        if self.kill_at is not None and now >= self.kill_at:
            for state in self.ranks:
                if state.returncode is None:
                    kill_group(state.process.pid)

    def _detect_hang(self, now: float) -> None:
        if self.hang_timeout is None or self.controls.get("paused"):
            return
        live = [r for r in self.ranks if r.returncode is None and not r.finished]
        # Before its first step a rank is starting up (imports, CUDA, data),
        # which can take longer than any step.
        hung = [
            r
            for r in live
            if now - r.progress_at
            > (self.hang_timeout if r.last_step >= 0 else max(self.hang_timeout, STARTUP_GRACE_S))
        ]
        if hung:
            for state in hung:
                state.hung = True
            for state in live:  # faulthandler in each worker prints its stacks
                signal_process(state.process.pid, signal.SIGUSR1)
            self.kill_at = now + STACK_DUMP_S

    def _end_ranks(self) -> None:
        """Kill what is left of this attempt's ranks and close what connects to them."""
        deadline = time.time() + 5.0
        for state in self.ranks:
            kill_group(state.process.pid)  # also reaches anything a worker started
            while state.process.poll() is None and time.time() < deadline:
                time.sleep(0.01)
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
