"""The live channel between the kernel and each worker rank.

One TCP connection per rank (never one shared queue: when a writer of a shared
multiprocessing queue is killed, the survivors and the reader can stall). The
kernel listens on 127.0.0.1 by default; a worker proves it holds the run's
secret token by answering a random challenge with an HMAC before anything else
is read from it, so no other local process can inject events or send controls.
Messages are JSON objects framed by ``multiprocessing.connection``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import socket
import struct
from multiprocessing.connection import Connection
from typing import Any

HANDSHAKE_TIMEOUT_S = 5.0
_NONCE_BYTES = 32
_RANK = struct.Struct("!I")


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
    """The kernel's end: a listening socket whose accepted connections are
    authenticated worker ranks.

    >>> server = ChannelServer(new_token())
    >>> server.address[0]
    '127.0.0.1'
    >>> server.close()
    """

    def __init__(self, token: str, host: str = "127.0.0.1"):
        self.token = token
        self._sock = socket.create_server((host, 0))
        self.address: tuple[str, int] = self._sock.getsockname()[:2]

    def fileno(self) -> int:
        return self._sock.fileno()

    def accept(self) -> tuple[int, Connection] | None:
        """Accept one pending connection; return (rank, connection), or None if
        the peer failed the handshake (it is closed and forgotten)."""
        sock, _ = self._sock.accept()
        try:
            sock.settimeout(HANDSHAKE_TIMEOUT_S)
            nonce = os.urandom(_NONCE_BYTES)
            sock.sendall(nonce)
            rank_bytes = _recv_exact(sock, _RANK.size)
            if not hmac.compare_digest(_recv_exact(sock, 32), _mac(self.token, nonce, rank_bytes)):
                raise ConnectionError("bad token")
            sock.settimeout(None)
        except (OSError, ConnectionError):
            sock.close()
            return None
        return _RANK.unpack(rank_bytes)[0], Connection(sock.detach())

    def close(self) -> None:
        self._sock.close()


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
