"""Another local user, for the security tests: a forked child of the test that
drops to uid/gid 65534 (nobody) and reports what it managed, as JSON on a pipe.

Dropping to another uid takes root, which the tests have in CI. The child only
runs standard-library code that the parent imported already (a forked child of
a threaded process must not import), and is killed if it takes too long.
"""

from __future__ import annotations

import encodings.idna  # noqa: F401  (socket needs it; nobody cannot read the interpreter's files to import it)
import json
import os
import select
import signal
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

import pytest

UID = 65534
STORE_MAGIC = struct.pack("<I", 0x3C85F7CE)  # what torch's TCPStore client sends first (libuv server)
VALIDATE, SET, GETNUMKEYS = b"\x00", b"\x01", b"\x07"


def needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("playing another local user takes root (as in CI)")


def as_stranger(probe: Callable[..., Any], *args: Any, timeout: float = 60.0) -> Any:
    """``probe(*args)`` run as uid 65534; what it returned."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the stranger
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(UID)
            os.setuid(UID)
            result = probe(*args)
            os.write(write_end, json.dumps(result).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while (left := deadline - time.monotonic()) > 0 and select.select([read_end], [], [], left)[0]:
            chunk = os.read(read_end, 65536)
            if not chunk:  # the stranger is done
                break
            chunks.append(chunk)
    finally:
        os.close(read_end)
        os.kill(pid, signal.SIGKILL)  # a no-op on one that has exited; waitpid reaps it either way
        os.waitpid(pid, 0)
    data = b"".join(chunks)
    return json.loads(data) if data else None


def whoami() -> int:
    return os.geteuid()


def _connect(port: int, timeout: float) -> socket.socket:
    sock = socket.socket()  # a numeric address: no name lookup
    sock.settimeout(timeout)
    sock.connect(("127.0.0.1", port))
    return sock


def store_probe(port: int, keys: int, key_mb: int) -> str:
    """Speak torch's TCPStore protocol at ``port``: write ``keys`` keys of
    ``key_mb`` MiB each (the store keeps them in the kernel's memory), then
    ask how many keys there are."""
    try:
        sock = _connect(port, 2.0)
    except OSError as exc:
        return f"no connection ({type(exc).__name__})"
    value = b"\0" * (key_mb << 20)
    try:
        with sock:
            sock.sendall(VALIDATE + STORE_MAGIC)
            for n in range(keys):
                key = f"/intruder{n}".encode()
                sock.sendall(SET + struct.pack("<Q", len(key)) + key + struct.pack("<Q", len(value)) + value)
            sock.sendall(GETNUMKEYS)
            answer = sock.recv(8)
    except OSError as exc:
        return f"closed ({type(exc).__name__})"
    return f"answered: {struct.unpack('<q', answer)[0]} keys" if len(answer) == 8 else "closed"


def channel_probe(port: int) -> str:
    """Connect to a channel listener and see whether it speaks first (the challenge)."""
    try:
        sock = _connect(port, 2.0)
    except OSError as exc:
        return f"no connection ({type(exc).__name__})"
    try:
        with sock:
            data = sock.recv(64)
    except TimeoutError:
        return "silence"
    except OSError as exc:
        return f"closed ({type(exc).__name__})"
    return f"challenge of {len(data)} bytes" if data else "closed"


def open_probe(path: str) -> str:
    """Try to open ``path`` for reading and writing."""
    try:
        os.close(os.open(path, os.O_RDWR))
    except OSError as exc:
        return f"refused ({exc.strerror})"
    return "opened"
