"""A relay on 127.0.0.1 that lets only this user's processes through to a
service that cannot check who connects (torch's rendezvous store).

It accepts a connection, asks the kernel who owns the other end
(``ddlkit.peers``) and closes it at once if that is another user, before
reading a byte: a stranger can make the relay allocate nothing. A
connection from this user gets its own connection to the service, made by the
backend's ``dial``, and bytes are copied both ways (two threads per
connection, each blocked in ``recv``/``sendall``: what is in flight is bounded
by the sockets' buffers). An end that closes its sending side is passed on as
such, so a request written just before a close still arrives.
"""

from __future__ import annotations

import selectors
import socket
import threading
from collections.abc import Callable
from typing import Protocol

from .. import peers

CHUNK = 65536


class Backend(Protocol):
    def dial(self) -> socket.socket:
        """A new connection to the service."""
        ...

    def hang_up(self, sock: socket.socket) -> None:
        """Close a connection ``dial`` made."""
        ...


class Relay:
    """Listens on ``host`` (any free port: :attr:`port`) until :meth:`close`."""

    def __init__(self, backend: Backend, host: str = "127.0.0.1"):
        self.backend = backend
        self._listener = socket.create_server((host, 0))
        self.port: int = self._listener.getsockname()[1]
        self._doorman = peers.Doorman(self._listener)
        self._wake_read, self._wake_write = socket.socketpair()
        self._pairs: set[_Pair] = set()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept_loop, name="ddlkit-store-relay", daemon=True)
        self._thread.start()

    @property
    def refused(self) -> int:
        """Connections from other users, closed unread."""
        return self._doorman.refused

    def fds(self) -> list[int]:
        """The descriptors the relay holds for the whole run (a forked worker
        closes them; relayed connections come and go, so are not listed)."""
        return [self._listener.fileno(), self._wake_read.fileno(), self._wake_write.fileno()]

    def close(self) -> None:
        """Stop accepting and end every relayed connection."""
        self._wake_write.send(b"x")
        self._thread.join()
        with self._lock:
            pairs = list(self._pairs)
        for pair in pairs:
            pair.cut()
        for pair in pairs:
            pair.join()
        for sock in (self._listener, self._wake_read, self._wake_write):
            sock.close()

    def _accept_loop(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self._listener, selectors.EVENT_READ)
            selector.register(self._wake_read, selectors.EVENT_READ)
            while not any(key.fileobj is self._wake_read for key, _ in selector.select()):
                self._accept()

    def _accept(self) -> None:
        front = self._doorman.accept()
        if front is None:
            return
        try:
            back = self.backend.dial()
        except OSError:  # the service is gone (the run is ending)
            front.close()
            return
        for sock in (front, back):  # store requests are small: Nagle would hold each one back
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pair = _Pair(front, back, self._ended)
        with self._lock:
            self._pairs.add(pair)
        pair.start()

    def _ended(self, pair: _Pair) -> None:
        with self._lock:
            self._pairs.discard(pair)
        pair.front.close()
        self.backend.hang_up(pair.back)


class _Pair:
    """One relayed connection: a client's end (front) and the service's (back)."""

    def __init__(self, front: socket.socket, back: socket.socket, on_end: Callable[[_Pair], None]):
        self.front, self.back, self.on_end = front, back, on_end
        self._threads = [
            threading.Thread(target=self._pump, args=(front, back), name="ddlkit-relay-in", daemon=True),
            threading.Thread(target=self._pump, args=(back, front), name="ddlkit-relay-out", daemon=True),
        ]
        self._running = len(self._threads)
        self._lock = threading.Lock()

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def join(self) -> None:
        for thread in self._threads:
            thread.join()

    def cut(self) -> None:
        """End both directions now (wakes both threads)."""
        for sock in (self.front, self.back):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:  # already closed or never connected
                pass

    def _pump(self, source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(CHUNK):
                target.sendall(data)
            target.shutdown(socket.SHUT_WR)  # all that the source said, then its end
        except OSError:  # one end broke: end the other direction too
            self.cut()
        with self._lock:
            self._running -= 1
            last = self._running == 0
        if last:
            self.on_end(self)
