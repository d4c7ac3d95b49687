"""The live channel between the kernel and each worker rank.

One TCP connection per rank (never one shared queue: when a writer of a shared
multiprocessing queue is killed, the survivors and the reader can stall). The
kernel listens on 127.0.0.1 by default; a worker proves it holds the run's
secret token by answering a random challenge with an HMAC before anything else
is read from it, so no other local process can inject events or send controls.
Connections from another user are closed before that (``ddlkit.peers``), and
handshakes run on the server's own thread with a deadline, so a peer that
connects and stays silent delays no rank. Messages are JSON objects framed by
``multiprocessing.connection``.
"""

from __future__ import annotations

# A socket address given as a string goes through the "idna" codec, whose first use imports this module
# (4 ms of a rank's start): imported here, in the kernel and the warm starter, every rank they fork has it.
import encodings.idna  # noqa: F401
import hashlib
import hmac
import json
import os
import queue
import selectors
import socket
import struct
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from . import peers

HANDSHAKE_TIMEOUT_S = 5.0  # from connecting to a complete answer; a rank needs milliseconds
MAX_PENDING = 64  # handshakes under way at once; beyond, the oldest is dropped
_NONCE_BYTES = 32
_RANK = struct.Struct("!I")
_ANSWER = struct.Struct("!I32s")  # the rank, and the HMAC of nonce + rank


def new_token() -> str:
    """A fresh secret for one run (hex, so it travels in an environment variable)."""
    return os.urandom(32).hex()


def _mac(token: str, nonce: bytes, rank_bytes: bytes) -> bytes:
    return hmac.new(bytes.fromhex(token), nonce + rank_bytes, hashlib.sha256).digest()


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("peer closed the channel during the handshake")
        data += chunk
    return data


class ChannelServer:
    """The kernel's end: a listening socket on 127.0.0.1, and a thread of its own
    that handshakes every connection with a deadline, so that a peer that
    connects and says nothing delays no one (the supervisor's thread only ever
    sees authenticated ranks). A connection from another user is closed
    unread (``ddlkit.peers``); one from this user that does not answer the
    challenge within ``HANDSHAKE_TIMEOUT_S`` is closed then.

    >>> server = ChannelServer(new_token())
    >>> server.address[0], server.accept() is None  # nobody connected yet
    ('127.0.0.1', True)
    >>> server.close()
    """

    def __init__(self, token: str, host: str = "127.0.0.1"):
        self.token = token
        self._sock = socket.create_server((host, 0))
        self._sock.setblocking(False)
        self.address: tuple[str, int] = self._sock.getsockname()[:2]
        self._doorman = peers.Doorman(self._sock)
        self._ready: queue.Queue[tuple[int, Connection]] = queue.Queue()
        self._bell_read, self._bell_write = socket.socketpair()  # one byte per ready connection
        self._stop_read, self._stop_write = socket.socketpair()
        self._pending: dict[socket.socket, _Handshake] = {}  # only the handshake thread touches it
        self._thread = threading.Thread(target=self._handshakes, name="ddlkit-channel-handshakes", daemon=True)
        self._thread.start()

    @property
    def refused(self) -> int:
        """Connections from other users, closed unread."""
        return self._doorman.refused

    def fileno(self) -> int:
        """Readable while an authenticated connection waits for :meth:`accept`."""
        return self._bell_read.fileno()

    def fds(self) -> list[int]:
        """The descriptors the server holds for the whole run (a forked worker
        closes them; one of a passing connection may be closed and its number
        reused meanwhile, so those are not listed)."""
        own = (self._sock, self._bell_read, self._bell_write, self._stop_read, self._stop_write)
        return [sock.fileno() for sock in own]

    def accept(self, timeout: float = 0.0) -> tuple[int, Connection] | None:
        """The next authenticated (rank, connection), waiting up to ``timeout``
        s for one; None if there is none."""
        try:
            accepted = self._ready.get(timeout=timeout) if timeout else self._ready.get_nowait()
        except queue.Empty:
            return None
        self._bell_read.recv(1)
        return accepted

    def close(self) -> None:
        """Stop listening; close every connection not yet accepted."""
        if self._thread.is_alive():
            self._stop_write.send(b"x")
            self._thread.join()
        while (accepted := self.accept()) is not None:
            accepted[1].close()
        for sock in (self._sock, self._bell_read, self._bell_write, self._stop_read, self._stop_write):
            sock.close()

    # ---- the handshake thread -------------------------------------------------
    def _handshakes(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self._sock, selectors.EVENT_READ)
            selector.register(self._stop_read, selectors.EVENT_READ)
            while True:
                first = min((h.deadline for h in self._pending.values()), default=None)
                for key, _ in selector.select(None if first is None else max(0.0, first - time.monotonic())):
                    if key.fileobj is self._stop_read:
                        for sock in list(self._pending):
                            self._drop(selector, sock)
                        return
                    if key.fileobj is self._sock:
                        self._admit(selector)
                    else:
                        self._read(selector, key.fileobj)  # type: ignore[arg-type]
                now = time.monotonic()
                for sock, handshake in list(self._pending.items()):
                    if handshake.deadline <= now:
                        self._drop(selector, sock)

    def _admit(self, selector: selectors.BaseSelector) -> None:
        sock = self._doorman.accept()
        if sock is None:
            return
        nonce = os.urandom(_NONCE_BYTES)
        try:
            sock.sendall(nonce)  # a few bytes into a new connection's empty buffer: never blocks
        except OSError:
            sock.close()
            return
        sock.setblocking(False)
        self._pending[sock] = _Handshake(nonce, time.monotonic() + HANDSHAKE_TIMEOUT_S)
        oldest = next(iter(self._pending)) if len(self._pending) > MAX_PENDING else None
        selector.register(sock, selectors.EVENT_READ)
        if oldest is not None:  # bounded: a flood of silent peers costs at most MAX_PENDING sockets
            self._drop(selector, oldest)

    def _read(self, selector: selectors.BaseSelector, sock: socket.socket) -> None:
        handshake = self._pending.get(sock)
        if handshake is None:  # dropped earlier in the same round (the oldest, over MAX_PENDING)
            return
        try:
            data = sock.recv(_ANSWER.size - len(handshake.answer))
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._drop(selector, sock)
            return
        handshake.answer += data
        if len(handshake.answer) < _ANSWER.size:
            return
        rank_bytes, mac = handshake.answer[: _RANK.size], handshake.answer[_RANK.size :]
        if not hmac.compare_digest(mac, _mac(self.token, handshake.nonce, rank_bytes)):
            self._drop(selector, sock)
            return
        selector.unregister(sock)
        del self._pending[sock]
        sock.setblocking(True)
        self._ready.put((_RANK.unpack(rank_bytes)[0], Connection(sock.detach())))
        self._bell_write.send(b"\0")

    def _drop(self, selector: selectors.BaseSelector, sock: socket.socket) -> None:
        selector.unregister(sock)
        del self._pending[sock]
        sock.close()


@dataclass
class _Handshake:
    nonce: bytes
    deadline: float  # time.monotonic()
    answer: bytes = b""


def connect(address: tuple[str, int], token: str, rank: int) -> Connection:
    """The worker's end: connect, answer the challenge, return the connection."""
    sock = socket.create_connection(address, timeout=HANDSHAKE_TIMEOUT_S)
    nonce = _recv_exact(sock, _NONCE_BYTES)
    rank_bytes = _RANK.pack(rank)
    sock.sendall(rank_bytes + _mac(token, nonce, rank_bytes))
    sock.settimeout(None)
    return Connection(sock.detach())


def send(conn: Connection, message: Any) -> None:
    conn.send_bytes(json.dumps(message, default=jsonable).encode())


def recv(conn: Connection) -> Any:
    return json.loads(conn.recv_bytes())


def jsonable(value: Any) -> Any:
    """Numbers a user logs are often tensors or numpy scalars."""
    if hasattr(value, "item"):
        return value.item()
    return str(value)
