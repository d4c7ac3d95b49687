"""The rendezvous store every rank meets at, out of other local users' reach.

torch's ``TCPStore`` has no authentication: anyone on the machine who can
connect to it can read, overwrite or delete its keys, or fill it with data
(the kernel hosts it, so the kernel's memory). Its server cannot listen on a
unix socket (libuv refuses one) and offers no hook to vet a connection, and
the ranks' side is torch's own client (``init_process_group("env://")`` in a
user's function), which cannot answer a challenge. So the kernel keeps
torch's server as it is and puts two walls around it:

- **A relay** (``ddlkit.kernel.relay``) on 127.0.0.1 is the address the
  ranks are given (``MASTER_PORT``). It closes, unread, every connection whose
  client socket the kernel lists as another user's (``ddlkit.peers``) and
  relays this user's connections to the store.
- **A socket filter** on the store's own listening socket (classic BPF,
  ``SO_ATTACH_FILTER``): the kernel drops every connection attempt to it
  except from a local port the relay has just bound and holds for the
  connection's lifetime. Another user cannot bind a port the relay holds, so
  cannot reach the store directly although its port is listed in
  ``/proc/net/tcp``.

The store listens unfiltered for the moment torch needs to connect its own
client; after sealing, the kernel checks that no other socket reached it then
and that it holds no key, or starts again with a new store.

Elsewhere than Linux neither check exists and the store is torch's, open to
any local user (``docs/security.md``).

Making one takes 2-3 ms (the store's server, the seal, the check for
strangers, the relay's thread), a tenth of a launch from a ready starter. So
when a run's rendezvous closes, the next run's is made (:func:`next_rendezvous`
takes it), sealed and relayed from the start as any other.
"""

from __future__ import annotations

import ctypes
import os
import socket
import struct
import threading
import weakref
from datetime import timedelta

from torch.distributed import TCPStore

from .. import peers
from .relay import Relay

SO_ATTACH_FILTER = getattr(socket, "SO_ATTACH_FILTER", 26)
_ATTEMPTS = 3
# Classic BPF, as <linux/filter.h> spells it. A TCP socket's filter sees the
# packet from the TCP header on; the IP header is at SKF_NET_OFF.
_LD_W_ABS, _LD_H_ABS, _JEQ_K, _JA, _RET_K = 0x20, 0x28, 0x15, 0x05, 0x06
_SKF_NET_OFF = -0x100000
_IP_SOURCE, _TCP_SOURCE_PORT = (_SKF_NET_OFF + 12) & 0xFFFFFFFF, 0
_ACCEPT, _DROP = 0xFFFFFFFF, 0


def admit_only(host: str, ports: set[int]) -> bytes:
    """A classic BPF program that keeps TCP packets from ``host`` and one of
    ``ports`` and drops all others, as (code, jt, jf, k) instructions packed.

    >>> len(admit_only("127.0.0.1", {5000, 5001})) // 8  # instructions
    10
    """
    address = struct.unpack("!I", socket.inet_aton(host))[0]
    program = [(_LD_W_ABS, 0, 0, _IP_SOURCE), (_JEQ_K, 1, 0, address), (_RET_K, 0, 0, _DROP)]
    program.append((_LD_H_ABS, 0, 0, _TCP_SOURCE_PORT))
    for index, port in enumerate(sorted(ports)):  # each: equal -> the jump to accept, else skip it
        left = len(ports) - index - 1
        program += [(_JEQ_K, 0, 1, port), (_JA, 0, 0, 2 * left + 1)]
    program += [(_RET_K, 0, 0, _DROP), (_RET_K, 0, 0, _ACCEPT)]
    return b"".join(struct.pack("HBBI", *instruction) for instruction in program)


class Seal:
    """The filter on the store's listening socket, and the only way through it."""

    def __init__(self, listener: socket.socket):
        # Our own handle on the socket whose descriptor torch will own.
        self._listener = socket.socket(fileno=os.dup(listener.fileno()))
        self.address: tuple[str, int] = listener.getsockname()[:2]
        self._ports: dict[socket.socket, int] = {}
        self._lock = threading.Lock()

    def shut(self) -> None:
        """From now on only connections that :meth:`dial` makes get through."""
        with self._lock:
            self._apply()

    def dial(self) -> socket.socket:
        sock = socket.socket()
        sock.bind((self.address[0], 0))  # held until hang_up: no one else can send from this port
        with self._lock:
            self._ports[sock] = sock.getsockname()[1]
            self._apply()
        try:
            sock.connect(self.address)
        except OSError:
            self.hang_up(sock)
            raise
        return sock

    def hang_up(self, sock: socket.socket) -> None:
        with self._lock:  # the port leaves the filter before it is free for anyone to bind
            self._ports.pop(sock, None)
            self._apply()
        sock.close()

    def fileno(self) -> int:
        return self._listener.fileno()

    def close(self) -> None:
        self._listener.close()

    def _apply(self) -> None:
        code = admit_only(self.address[0], set(self._ports.values()))
        buffer = ctypes.create_string_buffer(code)
        program = struct.pack("HL", len(code) // 8, ctypes.addressof(buffer))  # struct sock_fprog
        self._listener.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, program)  # the kernel copies it


class Rendezvous:
    """The TCPStore every rank meets at, hosted by the kernel so that it outlives
    any rank, reachable only by this user's processes: ranks dial :attr:`port`
    (the relay's); the store's own listens on one of :attr:`private_ports`."""

    def __init__(self, host: str = "127.0.0.1", timeout_s: float = 300.0):
        for _ in range(_ATTEMPTS):
            before = peers.own_sockets() if peers.CHECKED else {}
            listener = socket.create_server((host, 0))
            store_port = listener.getsockname()[1]
            seal = Seal(listener) if peers.CHECKED else None
            self._store: TCPStore | None = TCPStore(
                host,
                store_port,
                None,
                True,
                timedelta(seconds=timeout_s),
                wait_for_workers=False,
                master_listen_fd=listener.detach(),
            )
            if seal is None:
                self.seal, self.relay, self.port, self.private_ports = None, None, store_port, []
                return
            # Its listening socket and its own client's connection, which a forked rank closes too.
            made = {fd: inode for fd, inode in peers.own_sockets().items() if before.get(fd) != inode}
            self._store_sockets = {fd: inode for fd, inode in made.items() if fd != seal.fileno()}
            seal.shut()
            if not peers.strangers_connected_to(seal.address) and self._store.num_keys() == 0:
                break
            self._store = None  # someone reached it in the moment it was open: use another
            seal.close()
        else:
            raise RuntimeError(f"another process kept connecting to ddlkit's rendezvous store ({_ATTEMPTS} tries)")
        self.seal, self.relay = seal, Relay(seal, host)
        self.port, self.private_ports = self.relay.port, [store_port]
        _open.add(self)

    def fds(self) -> list[int]:
        """The descriptors that reach the store (a forked worker closes them)."""
        if self.relay is None or self.seal is None:
            return []
        now = peers.own_sockets()  # only those still the store's: a number another thread freed may be reused
        store = [fd for fd, inode in self._store_sockets.items() if now.get(fd) == inode]
        return [*self.relay.fds(), self.seal.fileno(), *store]

    def close(self) -> None:
        _open.discard(self)
        if self.relay is not None:
            self.relay.close()
        self._store = None  # the store owns its listening socket and closes it when destroyed
        if self.seal is not None:
            self.seal.close()


_open: weakref.WeakSet[Rendezvous] = weakref.WeakSet()  # every one not closed: a forked rank closes them all
_made_ahead: list[Rendezvous] = []  # at most one, for the next run
_made_ahead_lock = threading.Lock()


def next_rendezvous() -> Rendezvous:
    """The next run's rendezvous: the one made ahead of time, else a new one."""
    with _made_ahead_lock:
        if _made_ahead:
            return _made_ahead.pop()
    return Rendezvous()


def make_the_next() -> None:
    """Make the next run's rendezvous now (after a run's, off a launch's path), unless there is one."""
    with _made_ahead_lock:
        if _made_ahead:
            return
    try:
        made = Rendezvous()
    except (OSError, RuntimeError):  # no port, no thread (the kernel is exiting): the next launch makes its own
        return
    with _made_ahead_lock:
        if not _made_ahead:
            _made_ahead.append(made)
            return
    made.close()  # another thread made one meanwhile


def kernel_fds() -> list[int]:
    """The descriptors of every rendezvous this kernel holds (runs' and the next run's): a forked rank closes them."""
    return sorted({fd for rendezvous in list(_open) for fd in rendezvous.fds()})
