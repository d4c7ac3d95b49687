"""Who is on the other end of a loopback TCP connection.

A TCP socket carries no credentials (a unix socket has ``SO_PEERCRED``), but
on Linux the kernel lists every TCP socket of this network namespace
(over netlink, ``ddlkit.sockdiag``, or else in ``/proc/net/tcp``), each with
the uid that owns it and its inode. The listing is the kernel's, so another
local user cannot forge it: a connection whose client socket belongs to
another uid is a stranger's, whatever it sends.

ddlkit's listeners (the channel, the rendezvous store) close a stranger's
connection as soon as it is accepted, before reading a byte from it.

>>> import socket
>>> server = socket.create_server(("127.0.0.1", 0))
>>> client = socket.create_connection(server.getsockname())
>>> accepted, _ = server.accept()
>>> same_user(accepted)  # this process made the client
True
>>> for s in (client, accepted, server):
...     s.close()
"""

from __future__ import annotations

import os
import socket
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from . import sockdiag

CHECKED = sys.platform == "linux"  # elsewhere there is no /proc/net/tcp to ask
_TCP_TABLES = (Path("/proc/net/tcp"), Path("/proc/net/tcp6"))  # torch's client may use an IPv6 socket
_TIME_WAIT, _LISTEN = "06", "0A"


class TcpSocket(NamedTuple):
    """One line of ``/proc/net/tcp``: a TCP socket on this machine."""

    local: tuple[str, int]
    remote: tuple[str, int]
    state: str  # the kernel's hex code: 01 established, 06 time-wait, 0A listening, ...
    uid: int
    inode: int


def _host(packed: bytes) -> str:
    """An address as the kernel packs it; an IPv6 socket's IPv4-mapped address
    ('::ffff:127.0.0.1') as the IPv4 one it stands for."""
    if len(packed) == 16 and packed[:12] == b"\0" * 10 + b"\xff\xff":
        packed = packed[12:]
    return socket.inet_ntop(socket.AF_INET if len(packed) == 4 else socket.AF_INET6, packed)


def _address(field: str) -> tuple[str, int]:
    """'0100007F:1F90' (a line of /proc/net/tcp) -> ('127.0.0.1', 8080)."""
    host, port = field.split(":")
    packed = b"".join(struct.pack("=I", int(host[i : i + 8], 16)) for i in range(0, len(host), 8))
    return _host(packed), int(port, 16)


def tcp_sockets() -> Iterator[TcpSocket]:
    """Every TCP socket of this network namespace, as the kernel lists them:
    over netlink where it answers, else from ``/proc/net/tcp``."""
    try:
        table = sockdiag.tcp_sockets()
    except OSError:
        yield from _proc_tcp_sockets()
        return
    for state, local, local_port, remote, remote_port, uid, inode in table:
        yield TcpSocket((_host(local), local_port), (_host(remote), remote_port), f"{state:02X}", uid, inode)


def _proc_tcp_sockets() -> Iterator[TcpSocket]:
    for path in _TCP_TABLES:
        if not path.exists():  # a kernel without IPv6
            continue
        with open(path) as table:
            next(table)  # the header
            for line in table:
                fields = line.split()
                local, remote = _address(fields[1]), _address(fields[2])
                yield TcpSocket(local, remote, fields[3], int(fields[7]), int(fields[9]))


def owner_uid(accepted: socket.socket) -> int | None:
    """The uid owning the client end of ``accepted`` (None: gone already, or unknown)."""
    try:
        ours, theirs = accepted.getsockname()[:2], accepted.getpeername()[:2]
    except OSError:
        return None
    try:
        found = sockdiag.owner(theirs, ours)  # one lookup, not a dump of every socket
        if found is not None:
            state, uid = found
            return uid if state != int(_TIME_WAIT, 16) else None
    except OSError:  # no netlink or inet_diag: the table below comes from /proc
        pass
    for entry in tcp_sockets():
        if entry.local == theirs and entry.remote == ours and entry.state != _TIME_WAIT:
            return entry.uid
    return None


def same_user(accepted: socket.socket) -> bool:
    """True if the process at the other end of ``accepted`` runs as this user.
    Where the platform cannot say (not Linux), every peer is let through."""
    return not CHECKED or owner_uid(accepted) == os.geteuid()


class Doorman:
    """Accepts connections on a listening socket and closes, unread, those from
    another user; counts them in :attr:`refused`."""

    def __init__(self, listener: socket.socket):
        self.listener = listener
        self.refused = 0

    def accept(self) -> socket.socket | None:
        """The next connection from this user, or None (a stranger's, closed; or
        one whose peer gave up before it was accepted)."""
        try:
            sock, _ = self.listener.accept()
        except OSError:
            return None
        if not same_user(sock):
            sock.close()
            self.refused += 1
            return None
        return sock


def own_sockets() -> dict[int, int]:
    """Every socket this process holds open: its descriptor and the socket's inode."""
    sockets = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # closed meanwhile (listdir's own fd, or another thread's)
            continue
        if target.startswith("socket:["):
            sockets[int(fd)] = int(target[8:-1])
    return sockets


def own_socket_inodes() -> set[int]:
    """The inodes of every socket this process holds open."""
    return set(own_sockets().values())


def strangers_connected_to(address: tuple[str, int]) -> list[TcpSocket]:
    """Client sockets connected (or connecting) to ``address`` that this process does not hold."""
    ours = own_socket_inodes()
    return [
        entry
        for entry in tcp_sockets()
        if entry.remote == address and entry.state not in (_TIME_WAIT, _LISTEN) and entry.inode not in ours
    ]
