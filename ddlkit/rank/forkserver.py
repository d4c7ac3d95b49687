"""The warm starter: one process per kernel, started on first use, that has
torch, accelerate and ddlkit imported and has never touched CUDA; ranks are
forked from it, so they start in milliseconds and inherit no CUDA state from
the kernel (the idea of multiprocessing's forkserver with preload).

Run as ``python -m ddlkit.rank.forkserver FD KERNEL_PID [--die-with-parent]``
by ``ddlkit.kernel.forkserver``. FD is this process's end of a unix
``SOCK_SEQPACKET`` socketpair that only the kernel holds the other end of
(no port, no path: nobody else can talk to it). One JSON object per message:

- kernel -> starter: ``{"op": "start", "argv": [...], "env": {...}, "cwd": ..., "threads": n}``
  (argv as for ``python -m ddlkit.worker``); ``{"op": "probe"}``.
- starter -> kernel: ``{"op": "ready"}`` or ``{"op": "failed", "error": ...}`` once
  at start; ``{"op": "started", "pid": p}`` with the read end of the rank's
  output pipe attached (SCM_RIGHTS); ``{"op": "exited", "pid": p, "code": c}``
  when a rank ends (as ``Popen.returncode``); ``{"op": "probe", ...}``.

A fork of this process takes ~10 ms (its page tables are large), and a
launch's ranks were forked one after the other: the last began ~20 ms after
the first. So the starter forks ``SPARES`` processes ahead of time, each in its
own process group and waiting on a pipe for its request; a start request goes
to a spare if one waits (no fork on the launch's path), else to a fresh fork.
Spares are forked again once the starter has had nothing to do for ``REFILL_S``.

The starter ends with the kernel: at end of file on its socket (also when the
kernel is SIGKILLed: the kernel's end closes with it) it kills every rank's
process group and exits; with ``--die-with-parent`` the kernel's death also
SIGKILLs it directly. Each rank dies with the starter the same way.
"""

from __future__ import annotations

import ctypes
import gc
import importlib
import io
import json
import os
import select
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any, NamedTuple, NoReturn

MAX_MESSAGE = 1 << 20  # an environment and an argv: a few kB
SPARES = 2  # processes forked ahead, waiting to become ranks: a launch's first ranks start without a fork
REFILL_S = 0.25  # after a launch, fork new spares this long after its last request (not while its ranks start)


def die_with_parent() -> None:
    """SIGKILL this process when its parent dies (Linux; a no-op elsewhere).
    Tied to the parent *thread* that forked it."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG


def preload() -> None:
    """What every rank imports, imported once, here. Never touches CUDA: with
    the NVML check, even a stray ``torch.cuda.is_available()`` initialises no
    CUDA driver in this process (a forked child could not use CUDA after that)."""
    os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"
    import accelerate  # noqa: F401
    import torch

    from .. import registry
    from ..data import read_shipped_files
    from . import entry, prewarm  # noqa: F401  (the rank loop and everything it imports; a spare's warm-up)

    # Imported on first use, in every rank, by torch.save; a rank imports nothing else that the starter
    # has not (checked with every strategy; ddlkit.channel imports the other, encodings.idna).
    importlib.import_module("torch.utils.serialization")

    registry.names()  # imports every built-in strategy
    read_shipped_files()
    gc.collect()
    gc.freeze()  # a rank's collections skip what was preloaded: no time scanning it, no copy of its pages
    if torch.cuda.is_initialized():
        raise RuntimeError("CUDA was initialised while preloading the warm starter: it cannot fork ranks")


def state() -> dict[str, Any]:
    """What a test (or a curious user) may check: no CUDA, and no Python thread
    but this one (a thread holding a lock at fork would leave it locked in the rank)."""
    import threading

    import torch

    return {
        "op": "probe",
        "pid": os.getpid(),
        "cuda_initialized": torch.cuda.is_initialized(),
        "python_threads": threading.active_count(),
        "modules": len(sys.modules),
    }


def send(sock: socket.socket, message: dict[str, Any], fds: list[int] | None = None) -> None:
    socket.send_fds(sock, [json.dumps(message).encode()], fds or [])


class Waiting(NamedTuple):
    """A forked process waiting for its rank's request: the starter keeps
    ``SPARES`` of them, so that a launch's ranks need no fork of their own."""

    pid: int
    request_fd: int  # the starter writes the request here, then closes it
    output_fd: int  # the read end of its output pipe, for the kernel


def fork_waiting(sock: socket.socket, inherited: list[int]) -> Waiting:
    """Fork a process that leads its own process group and, once the starter
    writes it a request, becomes that rank (``inherited``: descriptors it must
    not keep: the kernel's socket, the wake-up pipe, the other spares' pipes)."""
    request_read, request_fd = os.pipe()
    output_fd, output_write = os.pipe()
    pid = os.fork()
    if pid == 0:  # it never returns
        try:
            os.setpgid(0, 0)  # also done by the parent below: whoever runs first, no window
            die_with_parent()
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            for fd in (sock.fileno(), *inherited, request_fd, output_fd):
                os.close(fd)
            from . import prewarm  # preloaded

            prewarm.warm_up(stop=lambda: bool(select.select([request_read], [], [], 0)[0]))  # its request came
            with os.fdopen(request_read, "rb") as requests:
                data = requests.read()
            if data:  # nothing: the starter ended, or retired this spare
                become_rank(json.loads(data), output_write)
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(1)
    try:
        os.setpgid(pid, pid)
    except (ProcessLookupError, PermissionError):  # it already ended: its exit is seen by reap
        pass
    os.close(request_read)
    os.close(output_write)
    return Waiting(pid, request_fd, output_fd)


def start_rank(request: dict[str, Any], spares: list[Waiting], fork: Callable[[], Waiting], sock: socket.socket) -> int:
    """Hand ``request`` to a waiting spare (or a fresh fork), and its output to the kernel; its pid."""
    while True:
        waiting = spares.pop(0) if spares else fork()
        try:
            unsent = memoryview(json.dumps(request).encode())
            while unsent:  # the spare reads as it comes (an environment can outgrow the pipe's 64 kB)
                unsent = unsent[os.write(waiting.request_fd, unsent) :]
            break
        except BrokenPipeError:  # it ended before its request came (killed from outside): the next
            os.close(waiting.output_fd)
            os.waitpid(waiting.pid, 0)
        finally:
            os.close(waiting.request_fd)
    send(sock, {"op": "started", "pid": waiting.pid}, [waiting.output_fd])
    os.close(waiting.output_fd)
    return waiting.pid


def become_rank(request: dict[str, Any], write_fd: int) -> NoReturn:
    """In the forked child: what a fresh ``python -m ddlkit.worker ARGV`` would be."""
    import torch

    from .entry import main

    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(write_fd, 1)
    os.dup2(write_fd, 2)
    for fd in (null, write_fd):
        os.close(fd)
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), line_buffering=True, write_through=True)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True, write_through=True)
    os.chdir(request["cwd"])
    sys.path[0] = request["cwd"]  # as `python -m` puts the current folder first
    os.environ.clear()
    os.environ.update(request["env"])
    torch.set_num_threads(request["threads"])  # OMP_NUM_THREADS is read once, at import
    sys.argv = ["ddlkit.worker", *request["argv"]]
    main(request["argv"])


def reap(children: set[int], spares: list[Waiting], sock: socket.socket) -> None:
    """Report every rank that ended; forget spares that ended (killed from outside)."""
    for pid in list(children):
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            done, status = pid, 0
        if done:
            children.discard(pid)
            send(sock, {"op": "exited", "pid": pid, "code": os.waitstatus_to_exitcode(status)})
    for spare in list(spares):
        try:
            done = os.waitpid(spare.pid, os.WNOHANG)[0]
        except ChildProcessError:
            done = spare.pid
        if done:
            spares.remove(spare)
            os.close(spare.request_fd)
            os.close(spare.output_fd)


def serve(sock: socket.socket) -> None:
    """Answer the kernel until it goes away. Spares are forked while nothing
    else happens (``REFILL_S`` after a launch took them: not while its ranks start)."""
    wakeup = os.pipe()
    os.set_blocking(wakeup[1], False)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # a rank's end wakes the select below
    signal.set_wakeup_fd(wakeup[1])
    children: set[int] = set()
    spares: list[Waiting] = []
    refill_at = time.monotonic()

    def fork_one() -> Waiting:
        return fork_waiting(sock, [*wakeup, *(fd for spare in spares for fd in (spare.request_fd, spare.output_fd))])

    try:
        while True:
            wait = None if len(spares) >= SPARES else max(0.0, refill_at - time.monotonic())
            readable, _, _ = select.select([sock.fileno(), wakeup[0]], [], [], wait)
            if not readable:
                spares.append(fork_one())
            if wakeup[0] in readable:
                os.read(wakeup[0], 4096)
                reap(children, spares, sock)
            if sock.fileno() in readable:
                data = sock.recv(MAX_MESSAGE)
                if not data:  # the kernel is gone
                    return
                request = json.loads(data)
                if request["op"] == "start":
                    children.add(start_rank(request, spares, fork_one, sock))
                    refill_at = time.monotonic() + REFILL_S
                elif request["op"] == "probe":
                    send(sock, {**state(), "spares": [spare.pid for spare in spares]})
    finally:
        for pid in [*children, *(spare.pid for spare in spares)]:  # the kernel is gone: so are its ranks
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    sock = socket.socket(fileno=int(args[0]))
    if "--die-with-parent" in args:
        die_with_parent()
    if os.getppid() != int(args[1]):  # the kernel died before the line above took effect
        return
    try:
        preload()
    except BaseException:
        send(sock, {"op": "failed", "error": traceback.format_exc()})
        return
    send(sock, {"op": "ready"})
    try:
        serve(sock)
    except OSError:  # the kernel went away while we answered it
        pass


if __name__ == "__main__":
    main()
