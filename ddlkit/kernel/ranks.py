"""Supervising worker processes: how they ended, who failed first, and ending
them all.

Each worker leads its own process group (a session, when spawned), so a Jupyter interrupt
(SIGINT to the kernel's group) never reaches it and one ``killpg`` ends the
worker together with anything it started.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass, field

from .forkserver import StarterChild

# What a rank says when it only saw a peer die: it is the victim, not the culprit.
_PEER_FAILURE = re.compile(
    r"Connection reset by peer|Connection closed by peer|Broken pipe|Connection refused"
    r"|connectFullMesh|DistNetworkError|DistBackendError|Socket Timeout|Timed out|timed out"
    r"|NCCL communicator was aborted|recvBytes|sendBytes|ProcessGroupGloo|gloo/transport",
)


class ForkedProcess:
    """A worker made by ``os.fork``, with the part of ``Popen``'s interface the
    supervisor uses."""

    def __init__(self, pid: int):
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode


WorkerProcess = subprocess.Popen | ForkedProcess | StarterChild


@dataclass
class RankState:
    """What the kernel knows about one rank."""

    rank: int
    process: WorkerProcess
    connected: bool = False
    finished: bool = False  # sent its "finished" event: all its work is done
    returncode: int | None = None
    ended_at: float | None = None
    traceback: str | None = None
    error_at: float | None = None
    hung: bool = False
    frozen: str | None = None  # why a hung rank sent nothing at all (stopped by a signal, unresponsive)
    last_step: int = -1
    progress_at: float = 0.0  # when last_step last advanced (or launch time, or the end of its start-up)
    heard_at: float = 0.0  # when anything last came from it (its heartbeat comes once a second)
    started: bool = False  # past start-up: in its loop
    waiting: bool = False  # its last heartbeat found it in communication, waiting for a peer
    ended_by_ddlkit: bool = False  # ddlkit killed it (the run was ending), it did not die of itself
    output_tail: list[str] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        if self.hung or self.traceback is not None:
            return True
        return self.returncode is not None and not self.finished

    @property
    def victim(self) -> bool:
        """Failed only because a peer failed first."""
        return self.traceback is not None and bool(_PEER_FAILURE.search(self.traceback))

    @property
    def killed_by_ddlkit(self) -> bool:
        """Still running when ddlkit ended the run, and ended by ddlkit's SIGKILL."""
        return self.ended_by_ddlkit and self.returncode == -signal.SIGKILL

    def describe(self) -> str:
        if self.hung:
            what = f"hung: no step for longer than the hang timeout (last step {self.last_step})"
            what += f"; {self.frozen}" if self.frozen else ""
        elif self.returncode is None:
            what = "still running when the run was ended"
        elif self.killed_by_ddlkit and self.traceback is None and not self.finished:
            return f"{'waiting for a peer' if self.waiting else 'still running'}, killed by ddlkit when the run ended"
        elif self.returncode < 0:
            what = f"killed by {signal.Signals(-self.returncode).name}"
        else:
            what = f"exited with code {self.returncode}"
        if self.finished:
            return f"{what} after finishing all its work"
        if self.traceback is not None:
            kind = "a peer failed" if self.victim else "raised"
            return f"{what}; {kind}: {_last_line(self.traceback)}"
        if self.returncode is not None and not self.hung:
            return f"{what} without a traceback (killed or exited from outside Python's error handling)"
        return what

    def read_output(self, tail: list[str]) -> None:
        """Its last lines of output; a rank that exited with an error before it
        could report (no traceback event) printed its traceback there."""
        self.output_tail = tail
        if self.traceback is None and (self.returncode or 0) > 0 and not self.finished:
            self.traceback = traceback_in(tail)
            self.error_at = self.ended_at


def culprit(ranks: list[RankState]) -> RankState | None:
    """The rank whose failure came first for real: a rank with its own traceback,
    else one that died of itself without one (SIGKILL, os._exit), else a hung
    one, else a victim, else one that ddlkit ended. Earliest first within each kind."""
    failed = [r for r in ranks if r.failed]

    def order(r: RankState) -> tuple[int, float]:
        when = min(t for t in (r.error_at, r.ended_at, float("inf")) if t is not None)
        if r.traceback is not None and not r.victim:
            return 0, when
        if r.hung:
            return 2, when
        if r.traceback is None and not r.killed_by_ddlkit:
            return 1, when
        return (3 if r.traceback is not None else 4), when

    return min(failed, key=order) if failed else None


def traceback_in(lines: list[str]) -> str | None:
    """The last Python traceback in some output lines, if there is one.

    >>> print(traceback_in(["starting", "Traceback (most recent call last):", "  in f", "ValueError: bad"]))
    Traceback (most recent call last):
      in f
    ValueError: bad
    """
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last):")]
    return "\n".join(lines[starts[-1] :]) if starts else None


def failure_report(run_id: str, ranks: list[RankState]) -> str:
    first = culprit(ranks)
    lines = [f"run {run_id} failed; first failure: rank {first.rank}" if first else f"run {run_id} failed"]
    lines += [f"  rank {r.rank}: {r.describe()}" + ("   <- first failure" if r is first else "") for r in ranks]
    if first is not None and first.traceback:
        lines += [f"traceback of rank {first.rank}:", first.traceback.rstrip()]
    elif first is not None and first.output_tail:
        lines += [f"last output of rank {first.rank}:", *first.output_tail[-30:]]
    return "\n".join(lines)


def kill_group(pid: int) -> None:
    """SIGKILL the worker's whole process group (it is the group's leader)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def wait_gone(process: WorkerProcess, timeout: float = 5.0) -> int | None:
    """Reap a killed worker (its exit status, None if still there after ``timeout`` s)."""
    deadline = time.time() + timeout
    while process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    return process.poll()


def signal_process(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else "(empty traceback)"
