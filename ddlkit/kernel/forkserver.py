"""The kernel's side of the warm starter (``ddlkit.rank.forkserver``): start
it on first use, ask it for ranks, and learn how they ended.

One starter per kernel, shared by every run. Its control channel is a unix
socketpair whose other end only the starter inherits: no port, no path. It
ends with the kernel (end of file on that socket, and a parent-death signal
when it was started from the kernel's main thread).

``DDLKIT_START=spawn`` (or ``launch(..., start="spawn")``) skips it: every
rank is then a fresh ``python -m ddlkit.worker``, as before the starter
existed, which is slower but has nothing shared to debug. Where the starter
cannot work (no ``os.fork``, or it failed to come up) ranks are spawned too.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

READY_TIMEOUT_S = 120.0  # importing torch on a loaded machine; typically 2-3 s
REPLY_TIMEOUT_S = 30.0
MAX_MESSAGE = 1 << 20


class StarterUnavailable(RuntimeError):
    """The warm starter could not be started here; ranks are spawned instead."""


class WarmStarter:
    """A running starter process and the socket to it. Thread-safe."""

    def __init__(self) -> None:
        if not hasattr(os, "fork") or not hasattr(socket, "send_fds"):
            raise StarterUnavailable("this platform has no os.fork or no descriptor passing")
        self._sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        argv = [sys.executable, "-m", "ddlkit.rank.forkserver", str(theirs.fileno()), str(os.getpid())]
        if threading.current_thread() is threading.main_thread():  # the death signal follows the forking thread
            argv.append("--die-with-parent")
        try:
            self.process = subprocess.Popen(
                argv,
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,  # a Jupyter interrupt (SIGINT to the kernel's group) never reaches it
            )
        finally:
            theirs.close()
        self._lock = threading.Lock()
        self._exits: dict[int, int] = {}
        self._ready: bool | None = None
        self.error: str | None = None
        self.alive = True

    @property
    def pid(self) -> int:
        return self.process.pid

    def fileno(self) -> int:
        """The kernel's end of the control socket (a rank forked from the kernel closes it)."""
        return self._sock.fileno()

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Block until the starter has preloaded; StarterUnavailable if it failed."""
        with self._lock:
            deadline = time.time() + timeout
            while self._ready is None and self.alive:
                if time.time() > deadline:
                    self.error = f"the warm starter was not ready after {timeout:.0f} s"
                    break
                self._receive(max(deadline - time.time(), 0.01))
            if not self._ready:
                raise StarterUnavailable(self.error or "the warm starter ended before it was ready")

    def is_ready(self) -> bool:
        """Preloaded and answering (a non-blocking look: while another thread
        talks to the starter, e.g. waits for it in :meth:`wait_ready`, what is known so far)."""
        if not self._lock.acquire(blocking=False):
            return bool(self._ready)
        try:
            while self._ready is None and self.alive and self._receive(0) is not None:
                pass
            return bool(self._ready)
        finally:
            self._lock.release()

    def start(self, argv: list[str], envs: list[dict[str, str]], threads: int) -> list[tuple[StarterChild, Any]]:
        """Fork one rank per environment in ``envs``, each running ``python -m
        ddlkit.worker ARGV`` with it over the kernel's environment; their
        processes and outputs (binary files). The requests go out together and
        the answers are read after (a round trip per rank cost the last rank ~2
        ms); if not every rank started, those that did are ended."""
        self.wait_ready()
        common = {"op": "start", "argv": argv, "cwd": os.getcwd(), "threads": threads}
        replies = self._ask([{**common, "env": {**os.environ, **env}} for env in envs], "started")
        if len(replies) < len(envs):
            for reply, fds in replies:  # each leads its process group
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(reply["pid"], signal.SIGKILL)
                for fd in fds:
                    os.close(fd)
            raise StarterUnavailable("the warm starter did not start every rank it was asked for")
        return [(StarterChild(reply["pid"], self), os.fdopen(fds[0], "rb", buffering=0)) for reply, fds in replies]

    def probe(self) -> dict[str, Any]:
        """The starter's own state: its pid, whether CUDA is initialised in it, its thread count."""
        self.wait_ready()
        replies = self._ask([{"op": "probe"}], "probe")
        if not replies:
            raise StarterUnavailable("the warm starter did not answer 'probe'")
        return replies[0][0]

    def exit_code(self, pid: int) -> int | None:
        """How rank ``pid`` ended, None while it runs."""
        with self._lock:
            while self.alive and self._receive(0):
                pass
            if pid not in self._exits and not self.alive and _gone(pid):
                self._exits[pid] = -signal.SIGKILL  # it died with the starter
            return self._exits.get(pid)

    def close(self) -> None:
        """End the starter (and with it any rank it still has)."""
        self._sock.close()
        self.alive = False
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def _ask(self, requests: list[dict[str, Any]], answer: str) -> list[tuple[dict[str, Any], list[int]]]:
        """Send every request, then read an ``answer`` to each (the starter answers
        in order); fewer if it ended or went quiet for ``REPLY_TIMEOUT_S``."""
        replies: list[tuple[dict[str, Any], list[int]]] = []
        with self._lock:
            for request in requests:
                self._sock.sendall(json.dumps(request).encode())
            deadline = time.time() + REPLY_TIMEOUT_S
            while self.alive and time.time() < deadline and len(replies) < len(requests):
                reply = self._receive(max(deadline - time.time(), 0.01))
                if reply is not None and reply[0]["op"] == answer:
                    replies.append(reply)
        return replies

    def _receive(self, timeout: float) -> tuple[dict[str, Any], list[int]] | None:
        """One message (exits and readiness are recorded here), None if none came in ``timeout`` s."""
        self._sock.settimeout(timeout)  # 0: only what is there already
        try:
            data, fds, _, _ = socket.recv_fds(self._sock, MAX_MESSAGE, 1)
        except (BlockingIOError, TimeoutError):
            return None
        except OSError:
            data, fds = b"", []
        if not data:
            self.alive = False
            self.error = self.error or "the warm starter ended"
            return None
        message = json.loads(data)
        if message["op"] == "exited":
            self._exits[message["pid"]] = message["code"]
        elif message["op"] in ("ready", "failed"):
            self._ready, self.error = message["op"] == "ready", message.get("error")
        return message, fds


class StarterChild:
    """A rank forked by the warm starter, with the part of ``Popen``'s
    interface the supervisor uses (it leads its own process group, so
    ``ddlkit.kernel.ranks.kill_group`` reaches it as any other rank)."""

    def __init__(self, pid: int, starter: WarmStarter):
        self.pid, self.starter = pid, starter
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.starter.exit_code(self.pid)
        return self.returncode


def _gone(pid: int) -> bool:
    """No such process any more (or only its zombie, which nobody of ours can reap)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


_current: WarmStarter | None = None
_current_lock = threading.Lock()


def warm_starter(wait: bool = True) -> WarmStarter:
    """This kernel's starter, started now if there is none (or it ended).
    ``wait=False`` returns at once: the starter preloads in the background.

    Example (it starts a process, so it is no doctest)::

        ddlkit.kernel.forkserver.warm_starter().probe()["cuda_initialized"]   # False
    """
    global _current
    with _current_lock:
        if _current is None or not _current.alive or _current.process.poll() is not None:
            if _current is not None:  # it ended (killed from outside?): reap it, start another
                _current.close()
            _current = WarmStarter()
        starter = _current
    if wait:
        starter.wait_ready()
    return starter


def current() -> WarmStarter | None:
    """The starter if one was started, without starting one."""
    return _current


def warm_up() -> None:
    """Start the warm starter in the background, so that the kernel's first
    launch finds torch imported (about 3 s saved; a ControlPanel does this
    when it is built). Nothing happens where the starter cannot work, or with
    ``DDLKIT_START=spawn``.

    Example (it starts a process, so it is no doctest)::

        ddlkit.warm_up()   # returns at once; put it in a notebook's first cell
    """
    if os.environ.get("DDLKIT_START", "").strip() == "spawn":
        return
    try:
        warm_starter(wait=False)
    except StarterUnavailable:
        pass


@atexit.register
def _end_the_starter() -> None:
    """At the kernel's exit (after its runs were stopped: registered first, run last)."""
    if _current is not None:
        _current.close()
