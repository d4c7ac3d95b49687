"""The kernel's collector: one background thread per run that carries events
from the ranks' connections into the Run, echoes their output tagged by rank,
and supervises them: a failed or hung rank ends the run, and when the run ends
no worker process and no port is left.
"""
from __future__ import annotations

import os
import selectors
import signal
import sys
import threading
import time
import traceback
from collections import deque
from functools import partial
from multiprocessing.connection import Connection
from typing import IO, TYPE_CHECKING, Any, Callable

from . import channel
from .elastic import Restarts
from .supervise import RankState, failure_report, kill_group, signal_process

if TYPE_CHECKING:
    from .channel import ChannelServer
    from .run import Run

FAILURE_GRACE_S = 2.0  # after a first failure, time for the other ranks to report theirs
RESTART_GRACE_S = 0.5  # the same, when the ranks will be restarted (their failure is recorded by then)
STARTUP_GRACE_S = 60.0  # the least time a rank gets to make its first step
STACK_DUMP_S = 1.0  # after a hang, time for the ranks to print their stacks
DRAIN_S = 2.0  # after the last exit, longest wait for output still in flight
GRACEFUL_STOP_S = 3.0  # after asking the ranks to stop, how long before they are killed
RELAUNCH_STOP_S = 30.0  # the same, before a new layout: losing the stop checkpoint would redo steps
SELECT_S = 0.1
MAX_MESSAGES_PER_READ = 1000  # keeps supervision running under a flood of events


class Collector:
    def __init__(self, run: "Run", ranks: list[RankState], outputs: dict[int, IO[bytes]],
                 server: "ChannelServer", rendezvous: Any, hang_timeout: float | None,
                 echo: bool | Callable[[str], None], starter: Any = None, attempt: int = 0,
                 announce: list[dict[str, Any]] = ()):
        self.run = run
        self.server = server
        self.rendezvous = rendezvous
        self.hang_timeout = hang_timeout
        self.echo = (lambda line: print(line, flush=True)) if echo is True else (echo or None)
        self.stop_requested = False
        self.graceful_stop = False  # the ranks were asked to stop at a step; kill only if they do not
        self.kill_at: float | None = None
        self.controls: dict[str, Any] = {}  # the state every rank should have: sent again to late joiners
        self._send_lock = threading.Lock()
        self.connections: dict[int, Connection] = {}
        self.selector = selectors.DefaultSelector()
        self.selector.register(server, selectors.EVENT_READ, self._accept)
        self.restarts = Restarts(self, starter, attempt, list(announce))
        self._adopt(ranks, outputs)
        self.thread = threading.Thread(target=self._loop, name=f"ddlkit-collector-{run.id}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _adopt(self, ranks: list[RankState], outputs: dict[int, IO[bytes]]) -> None:
        """Supervise a new set of ranks: at launch and for every restart."""
        self.ranks = ranks
        self.outputs = outputs
        self.kill_at = None
        self.tails = {r.rank: deque(maxlen=50) for r in ranks}
        self._partial = {r.rank: b"" for r in ranks}
        self._logs = {r.rank: open(self.run.path / f"rank{r.rank}.log", "ab") for r in ranks}
        for rank, stream in outputs.items():
            os.set_blocking(stream.fileno(), False)
            self.selector.register(stream, selectors.EVENT_READ, partial(self._read_output, rank))

    # ---- the loop ---------------------------------------------------------
    def _loop(self) -> None:
        internal_error = None
        try:
            all_exited_at = None
            self.run._record(self.restarts.announce)
            while True:
                batch: list[dict[str, Any]] = []
                for key, _ in self.selector.select(SELECT_S):
                    key.data(batch)
                if batch:
                    self.run._record(batch)
                now = time.time()
                self._supervise(now)
                if all(r.returncode is not None for r in self.ranks):
                    all_exited_at = all_exited_at or now
                    drained = not self.connections and not self.outputs
                    if drained or now - all_exited_at > DRAIN_S:
                        if not self.restarts.next_attempt():
                            break
                        all_exited_at = None
        except BaseException:  # a bug here must still end the workers
            internal_error = traceback.format_exc()
        finally:
            self._clean_up()
        self.run._finish(*self._verdict(internal_error))

    def _verdict(self, internal_error: str | None) -> tuple[str, str | None]:
        for state in self.ranks:
            state.output_tail = list(self.tails[state.rank])
        if internal_error:
            return "failed", f"run {self.run.id}: ddlkit's collector failed:\n{internal_error}"
        if self.stop_requested:
            return "stopped", None
        if any(r.failed for r in self.ranks):
            return "failed", failure_report(self.run.id, self.ranks)
        return "done", None

    # ---- supervision ------------------------------------------------------
    def _supervise(self, now: float) -> None:
        for state in self.ranks:
            if state.returncode is None and state.process.poll() is not None:
                state.returncode, state.ended_at = state.process.poll(), now
        if self.kill_at is None:
            if self.stop_requested:
                self.kill_at = now + (GRACEFUL_STOP_S if self.graceful_stop else 0.0)
            elif any(r.failed for r in self.ranks):
                self.kill_at = now + (RESTART_GRACE_S if self.restarts.left() else FAILURE_GRACE_S)
            elif self.restarts.new_config is not None:  # the ranks stop at a step and save it: give them time
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
        hung = [r for r in live if now - r.progress_at > (
            self.hang_timeout if r.last_step >= 0 else max(self.hang_timeout, STARTUP_GRACE_S))]
        if hung:
            for state in hung:
                state.hung = True
            for state in live:  # faulthandler in each worker prints its stacks
                signal_process(state.process.pid, signal.SIGUSR1)
            self.kill_at = now + STACK_DUMP_S

    def _clean_up(self) -> None:
        self._end_ranks()
        self.selector.close()
        self.server.close()
        self.rendezvous.close()

    def _end_ranks(self) -> None:
        """Kill what is left of this set of ranks and close what connects to it."""
        deadline = time.time() + 5.0
        for state in self.ranks:
            kill_group(state.process.pid)  # also reaches anything a worker started
            while state.process.poll() is None and time.time() < deadline:
                time.sleep(0.01)
            if state.returncode is None:
                state.returncode, state.ended_at = state.process.poll(), time.time()
        for rank in list(self.outputs):
            self._close_output(rank)
        for conn in self.connections.values():
            self.selector.unregister(conn)
            conn.close()
        self.connections.clear()
        for log in self._logs.values():
            log.close()

    # ---- controls (called from the kernel's thread) ------------------------
    def send_control(self, changes: dict[str, Any]) -> None:
        if changes.get("paused") is False:  # time spent paused is not a hang
            for state in self.ranks:
                state.progress_at = time.time()
        self.controls.update(changes)
        self.run._record([{"type": "control_request", "time": time.time(), **_jsonable_controls(changes)}])
        for rank, conn in list(self.connections.items()):
            self._send(rank, conn, {"type": "control", **changes})

    def _send(self, rank: int, conn: Connection, message: dict[str, Any]) -> None:
        try:
            with self._send_lock:
                channel.send(conn, _jsonable_controls(message))
        except OSError:  # the rank is gone; supervision deals with it
            pass

    # ---- reading ----------------------------------------------------------
    def _accept(self, batch: list[dict[str, Any]]) -> None:
        accepted = self.server.accept()
        if accepted is None:
            return
        rank, conn = accepted
        if not 0 <= rank < len(self.ranks) or rank in self.connections:
            conn.close()
            return
        self.connections[rank] = conn
        self.ranks[rank].connected = True
        self.selector.register(conn, selectors.EVENT_READ, partial(self._read_events, rank))
        if self.controls:  # changes made before this rank connected
            self._send(rank, conn, {"type": "control", **self.controls})
        if all(r.connected for r in self.ranks):
            self.run._set_status("running")

    def _read_events(self, rank: int, batch: list[dict[str, Any]]) -> None:
        conn = self.connections[rank]
        try:
            for _ in range(MAX_MESSAGES_PER_READ):
                for event in channel.recv(conn):  # each message is a batch of events
                    self._handle(self.ranks[rank], event, batch)
                if not conn.poll(0):
                    break
        except (EOFError, OSError):
            self.selector.unregister(conn)
            conn.close()
            del self.connections[rank]

    def _handle(self, state: RankState, event: dict[str, Any], batch: list[dict[str, Any]]) -> None:
        event["rank"] = state.rank  # a rank speaks only for itself
        kind = event.get("type")
        step = event.get("step")
        if isinstance(step, int) and step > state.last_step:
            state.last_step, state.progress_at = step, time.time()
        if kind == "beat":
            return
        if kind == "error":
            state.traceback, state.error_at = event.get("traceback", ""), event.get("time", time.time())
        elif kind == "finished":
            state.finished = True
            self.restarts.stopped_early = self.restarts.stopped_early or bool(event.get("stopped"))
        event["attempt"] = self.restarts.attempt
        batch.append(event)

    def _read_output(self, rank: int, _batch: list[dict[str, Any]]) -> None:
        try:
            data = os.read(self.outputs[rank].fileno(), 65536)
        except BlockingIOError:
            return
        if not data:
            self._close_output(rank)
            return
        self._logs[rank].write(data)
        self._logs[rank].flush()
        *lines, self._partial[rank] = (self._partial[rank] + data).split(b"\n")
        for line in lines:
            self._emit(rank, line)

    def _emit_note(self, line: str) -> None:
        if self.echo is not None:
            self.echo(f"ddlkit: {line}")

    def _emit(self, rank: int, line: bytes) -> None:
        text = line.decode(errors="replace").rstrip("\r")
        self.tails[rank].append(text)
        if self.echo is not None:
            try:
                self.echo(f"[rank {rank}] {text}")
            except Exception:  # a broken echo target must not end the run
                self.echo = None
                print(f"ddlkit: stopped echoing worker output: {sys.exc_info()[1]}", file=sys.stderr)

    def _close_output(self, rank: int) -> None:
        if self._partial[rank]:
            self._emit(rank, self._partial[rank])
            self._partial[rank] = b""
        stream = self.outputs.pop(rank)
        self.selector.unregister(stream)
        stream.close()


def _jsonable_controls(message: dict[str, Any]) -> dict[str, Any]:
    """JSON keys are strings: the slowdown map travels as {"1": 3.0}."""
    if "slowdown" in message:
        return {**message, "slowdown": {str(r): f for r, f in message["slowdown"].items()}}
    return message
