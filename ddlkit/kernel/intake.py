"""What comes in from the ranks: their authenticated channel connections
(events) and their output pipes (lines, echoed tagged by rank, kept in
``rank<r>.log``), read together through one selector by the supervisor's thread.
"""

from __future__ import annotations

import os
import selectors
import sys
import threading
from collections import deque
from collections.abc import Callable
from functools import partial
from multiprocessing.connection import Connection
from pathlib import Path
from typing import IO, Any

from .. import channel
from ..channel import ChannelServer
from ..files import open_private_fd
from .records import RecordError, write_all

MAX_MESSAGES_PER_READ = 1000  # keeps supervision running under a flood of events
TAIL_LINES = 50  # per rank, for the failure report

Arrival = tuple[int, dict[str, Any]]  # (rank, event)


class Intake:
    """One attempt's connections and output pipes at a time (``adopt`` switches)."""

    def __init__(self, server: ChannelServer, folder: Path, echo: Callable[[str], None] | None):
        self.server = server
        self.folder = folder
        self.echo = echo
        self.selector = selectors.DefaultSelector()
        self.selector.register(server, selectors.EVENT_READ, self._accept)
        self.connections: dict[int, Connection] = {}
        self.outputs: dict[int, IO[bytes]] = {}
        self.tails: dict[int, deque[str]] = {}
        self.world_size = 0
        self.on_connect: Callable[[int], None] = lambda rank: None
        self._partial: dict[int, bytes] = {}
        self._logs: dict[int, int] = {}  # rank -> file descriptor of rank<r>.log (unbuffered: nothing to lose at close)
        self._send_lock = threading.Lock()

    def adopt(self, world_size: int, outputs: dict[int, IO[bytes]]) -> None:
        """Read a new attempt's ranks (at launch and after every restart)."""
        self.world_size = world_size
        self.tails = {rank: deque(maxlen=TAIL_LINES) for rank in outputs}
        self._partial = {rank: b"" for rank in outputs}
        for rank in outputs:
            self._logs[rank] = self._open_log(rank)
        self.outputs = dict(outputs)
        for rank, stream in outputs.items():
            os.set_blocking(stream.fileno(), False)
            self.selector.register(stream, selectors.EVENT_READ, partial(self._read_output, rank))

    @property
    def drained(self) -> bool:
        """Every connection and pipe of the attempt closed by its rank."""
        return not self.connections and not self.outputs

    def poll(self, timeout: float) -> list[Arrival]:
        """Wait up to ``timeout`` s; return the events that arrived, by rank."""
        arrived: list[Arrival] = []
        for key, _ in self.selector.select(timeout):
            key.data(arrived)
        return arrived

    def send(self, message: dict[str, Any], rank: int | None = None) -> None:
        """To one rank, or to every connected rank; a rank that is gone is skipped."""
        for to, conn in list(self.connections.items()):
            if rank is None or to == rank:
                try:
                    with self._send_lock:
                        channel.send(conn, message)
                except OSError:  # the rank is gone; supervision deals with it
                    pass

    def say(self, line: str) -> None:
        """A note of ddlkit's own, through the same echo as the ranks' output."""
        if self.echo is not None:
            self.echo(f"ddlkit: {line}")

    def keep(self, rank: int, text: str) -> None:
        """Lines a rank sent as an event (its traceback): into its log and tail, not echoed (RunFailed shows it)."""
        if rank in self._logs:  # closed ones are gone from it
            self._log(rank, text.encode())
        if rank in self.tails:
            self.tails[rank].extend(text.rstrip("\n").splitlines())

    def end_attempt(self) -> None:
        """Close what connects to the attempt's ranks, after its last output."""
        for rank in list(self.outputs):
            self._close_output(rank)
        for conn in self.connections.values():
            self.selector.unregister(conn)
            conn.close()
        self.connections.clear()
        for log in self._logs.values():
            os.close(log)
        self._logs.clear()

    def close(self) -> None:
        try:
            self.end_attempt()
        finally:
            self.selector.close()
            self.server.close()

    def _open_log(self, rank: int) -> int:
        path = self.folder / f"rank{rank}.log"
        try:
            return open_private_fd(path, "ab")
        except OSError as exc:
            raise RecordError(f"cannot write {path}: {exc}") from exc

    # ---- reading ----------------------------------------------------------
    def _accept(self, _arrived: list[Arrival]) -> None:
        # Only authenticated ranks arrive here: the server handshakes on a thread of its own.
        while (accepted := self.server.accept()) is not None:
            rank, conn = accepted
            if not 0 <= rank < self.world_size or rank in self.connections:
                conn.close()
                continue
            self.connections[rank] = conn
            self.selector.register(conn, selectors.EVENT_READ, partial(self._read_events, rank))
            self.on_connect(rank)

    def _read_events(self, rank: int, arrived: list[Arrival]) -> None:
        conn = self.connections[rank]
        try:
            for _ in range(MAX_MESSAGES_PER_READ):
                arrived.extend((rank, event) for event in channel.recv(conn))  # a message is a batch of events
                if not conn.poll(0):
                    break
        except (EOFError, OSError):
            self.selector.unregister(conn)
            conn.close()
            del self.connections[rank]

    def _log(self, rank: int, data: bytes) -> None:
        try:
            write_all(self._logs[rank], data)
        except OSError as exc:
            raise RecordError(f"cannot write {self.folder / f'rank{rank}.log'}: {exc}") from exc

    def _read_output(self, rank: int, _arrived: list[Arrival]) -> None:
        try:
            data = os.read(self.outputs[rank].fileno(), 65536)
        except BlockingIOError:
            return
        if not data:
            self._close_output(rank)
            return
        self._log(rank, data)
        *lines, self._partial[rank] = (self._partial[rank] + data).split(b"\n")
        for line in lines:
            self._emit(rank, line)

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
