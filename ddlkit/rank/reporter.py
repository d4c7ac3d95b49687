"""The worker's end of the live channel: events out, controls in.

A rank started by ddlkit talks to the kernel over its own authenticated
connection (``ddlkit.channel``). A rank started by another launcher
(``accelerate launch`` on a cluster) has no kernel to talk to and appends the
same events to ``<run_dir>/events-rank<r>.jsonl`` instead.

An event is sent at once if nothing was sent in the last ``FLUSH_S``;
faster ones are queued and sent in batches every ``FLUSH_S`` by a background
thread, and at once when the rank reports an error or finishes, and the run's
first step row (the notebook shows a run as going when it arrives: its
launch latency). Values may be
tensors: they become numbers when sent, off the training step's path. One message per
step would wake the kernel's collector hundreds of times a second, and on a
machine with as many cores as ranks that steals CPU from the workers (5-8 % of
a 2.5 ms step measured here: 1.07x a bare loop at 20 ms batches,
1.04x at 100 ms). The price: a rank killed by SIGKILL loses the
events of its last ``FLUSH_S`` that were not sent yet.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections import deque
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from .. import channel, events
from ..controls import Controls, from_json
from ..files import make_dir, open_private

HEARTBEAT_S = 1.0
FLUSH_S = 0.1
# Code in which a blocked main thread waits for its peers (collectives, send/recv, DDP's backward).
COMMUNICATION = tuple(f"{os.sep}torch{os.sep}{part}{os.sep}" for part in ("distributed", "autograd"))

_active: Reporter | None = None


def log(step: int | None = None, **values: Any) -> None:
    """Stream values for this rank to the kernel, as one row of ``run.metrics``.

    Call it from a training function started by ``ddlkit.launch(fn, ...)``;
    outside a ddlkit run it does nothing, so the same function runs anywhere.
    Without ``step`` the rank's rows are numbered 0, 1, 2, ...

    >>> log(step=0, loss=1.25)  # a no-op outside a ddlkit run
    """
    if _active is not None:
        _active.step(step, **values)


class Reporter:
    """Sends this rank's events; holds the controls the kernel sent."""

    def __init__(self, rank: int, conn: Connection | None = None, file: Path | None = None):
        self.rank = rank
        self._conn = conn
        self._file = None
        if file is not None:
            self._file = open_private(file, "a")
            if _ends_half_written(file):
                self._file.write("\n")  # a restarted rank ends the line its killed predecessor left half-written
        self._lock = threading.Lock()
        self._pending: deque[dict[str, Any]] = deque()  # append and popleft are atomic
        self.last_step = -1
        self.stepped = False  # a step row was sent (the first goes at once)
        self.started = False  # past start-up: the rank loop runs
        self._flushed_at = 0.0
        self._parent = os.getppid()
        self._closing = False
        # The latest controls from the kernel (ddlkit.rank.sync applies them).
        self._controls: dict[str, Any] = {}
        self._control_version = 0
        self._control_changed = threading.Event()
        threading.Thread(target=self._flush_and_beat, name="ddlkit-reporter", daemon=True).start()
        if conn is not None:
            threading.Thread(target=self._receive, args=(conn,), name="ddlkit-controls", daemon=True).start()

    @classmethod
    def from_env(cls, rank: int, run_dir: Path) -> Reporter:
        """Connect as the environment set by ddlkit's launcher says, or fall back
        to a file in the run's folder."""
        if "DDLKIT_CHANNEL" in os.environ:
            host, port = os.environ["DDLKIT_CHANNEL"].rsplit(":", 1)
            conn = channel.connect((host, int(port)), os.environ["DDLKIT_TOKEN"], rank)
            return cls(rank, conn=conn)
        make_dir(run_dir)
        return cls(rank, file=run_dir / f"events-rank{rank}.jsonl")

    @property
    def to_kernel(self) -> bool:
        """Events go to a kernel (ddlkit's launcher), not to a file."""
        return self._conn is not None

    def activate(self) -> None:
        global _active
        _active = self

    def preset_controls(self, **controls: Any) -> None:
        """Controls in force from the start (the config's slowdown), unless the kernel sent others."""
        self._controls = {**controls, **self._controls}

    def take_controls(self, wait: float = 0.0) -> Controls:
        """The controls received so far, waiting up to ``wait`` s for a change."""
        if wait:
            self._control_changed.wait(wait)
        self._control_changed.clear()
        return Controls(**self._controls, version=self._control_version)

    def send(self, event: events.Event | dict[str, Any], now: bool = False) -> None:
        """Queue an event; ``now`` sends it, and everything queued before it, at once."""
        self._queue({"rank": self.rank, "time": time.time(), **event}, now)

    def step(self, step: int | None = None, **values: Any) -> None:
        """A step row. On the path of every logged step (``ddlkit.log`` in a
        burst: 10,000 a second), so it builds its one dict directly."""
        self.last_step = self.last_step + 1 if step is None else int(step)
        row: dict[str, Any] = {"rank": self.rank, "time": time.time(), "type": "step", "step": self.last_step}
        row.update(values)  # any keys a launched function logs, beside those events.Step names
        self._queue(row, now=not self.stepped)
        self.stepped = True

    def _queue(self, event: dict[str, Any], now: bool = False) -> None:
        self._pending.append(event)
        if now or time.monotonic() - self._flushed_at >= FLUSH_S:  # a quiet rank sends at once
            self.flush()

    def mark_started(self) -> None:
        """Start-up is over (the group is formed, the model built): the hang timeout applies from now."""
        self.started = True
        self.send(self._beat(), now=True)

    def _beat(self) -> events.Beat:
        return events.Beat(type="beat", step=self.last_step, started=self.started, waiting=main_thread_waiting())

    def error(self, traceback_text: str, restarting: bool = False) -> None:
        """``restarting``: the launcher will start the ranks again (a follower waits for them)."""
        error = events.Error(type="error", traceback=traceback_text)
        if restarting:
            error["restarting"] = True
        self.send(error, now=True)

    def flush(self) -> None:
        with self._lock:
            batch = [self._pending.popleft() for _ in range(len(self._pending))]
            self._flushed_at = time.monotonic()
            if not batch:
                return
            if self._conn is not None:
                channel.send(self._conn, batch)
            elif self._file is not None:
                self._file.writelines(json.dumps(e, default=channel.jsonable) + "\n" for e in batch)
                self._file.flush()

    def close(self) -> None:
        self._closing = True
        self.flush()
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            if self._file is not None:
                self._file.close()
                self._file = None

    def _flush_and_beat(self) -> None:
        # Besides flushing: progress for the kernel's hang detector (the step
        # counter, which a deadlocked main thread stops advancing while this
        # thread beats on), and a watch on the parent: a worker whose kernel
        # died ends too.
        next_beat = time.monotonic() + HEARTBEAT_S
        while True:
            time.sleep(FLUSH_S)
            try:
                if time.monotonic() >= next_beat:
                    next_beat += HEARTBEAT_S
                    if os.getppid() != self._parent:
                        os._exit(1)
                    self.send(self._beat())
                self.flush()
            except (OSError, ValueError):  # kernel gone, or closed at exit
                os._exit(1)

    def _receive(self, conn: Connection) -> None:
        while True:
            try:
                message = channel.recv(conn)
            except (EOFError, OSError):  # the kernel went away, or we closed
                if not self._closing:
                    os._exit(1)
                return
            if message.get("type") == "control":
                self.apply_control({k: v for k, v in message.items() if k != "type"})

    def apply_control(self, message: dict[str, Any]) -> None:
        """Take changes to the controls (as JSON: ``ddlkit.controls.to_json``),
        from the kernel's channel or a follower's control file."""
        # A replay (what was changed before this rank or attempt started) is in force from the
        # start, like the config's settings: not a change to report (it would mark the curve again).
        replay = message.get("replay") and self._control_version == 0
        changes = from_json({k: v for k, v in message.items() if k != "replay"})
        knobs = {**self._controls.get("knobs", {}), **changes.pop("knobs", {})}
        self._controls = {**self._controls, **changes, "knobs": knobs}
        self._control_version += 0 if replay else 1
        self._control_changed.set()


def _ends_half_written(path: Path) -> bool:
    """Whether the log ends in the middle of a line."""
    with open(path, "rb") as f:
        if f.seek(0, os.SEEK_END) == 0:
            return False
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


def main_thread_waiting() -> bool:
    """Whether the main thread is inside torch's communication code: blocked
    there, it waits for a peer; blocked anywhere else, it is the one that hangs."""
    frame = sys._current_frames().get(threading.main_thread().ident or 0)
    while frame is not None:
        if any(part in frame.f_code.co_filename for part in COMMUNICATION):
            return True
        frame = frame.f_back
    return False
