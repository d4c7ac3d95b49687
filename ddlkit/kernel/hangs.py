"""Which rank hangs, when the ranks stop making steps.

A rank that makes no step for ``hang_timeout`` seconds hangs, but the first
rank to be overdue is often not the one to blame: when one rank of a group
stops, its peers stop too, waiting for it in a collective or a receive, and
any of them may have logged its last step a moment earlier. So, once some rank
is overdue, each stalled rank is looked at:

1. frozen: stopped by a signal (SIGSTOP, a debugger: its state in ``/proc``),
   or silent past ``FROZEN_S`` (it beats once a second);
2. else blocked outside communication: its heartbeat says whether its main
   thread was in torch's communication code (``ddlkit.rank.reporter``); the
   one that is not is where the others wait;
3. only if every stalled rank waits on the others is the overdue one blamed.

Before its loop a rank is starting up (imports, CUDA, the group, data), which
can take longer than any step: it gets at least ``STARTUP_GRACE_S``.
"""

from __future__ import annotations

import signal

from .ranks import RankState, signal_process

STARTUP_GRACE_S = 60.0  # the least time a rank gets to reach its loop
FROZEN_S = 3.0  # a rank silent this long (it beats once a second) is frozen


def hung_ranks(ranks: list[RankState], now: float, hang_timeout: float) -> list[RankState]:
    """The ranks that hang, marked ``hung`` (and ``frozen``, with why); [] while no rank is overdue."""
    live = [r for r in ranks if r.returncode is None and not r.finished]
    overdue = [r for r in live if now - r.progress_at > allowance(r, hang_timeout)]
    if not overdue:
        return []
    stalled = [r for r in live if now - r.progress_at > allowance(r, hang_timeout) / 2]
    for state in stalled:
        state.frozen = frozen(state, now)
    hung = [r for r in stalled if r.frozen] or [r for r in stalled if not r.waiting] or overdue
    for state in hung:
        state.hung = True
    return hung


def allowance(state: RankState, hang_timeout: float) -> float:
    """Seconds without a step before a rank hangs."""
    return hang_timeout if state.started or state.last_step >= 0 else max(hang_timeout, STARTUP_GRACE_S)


def frozen(state: RankState, now: float) -> str | None:
    """Why a rank sends nothing at all, if it does not."""
    if process_state(state.process.pid) in ("T", "t"):
        return "stopped by a signal (SIGSTOP or a debugger): it sent nothing more"
    if state.heard_at and now - state.heard_at > FROZEN_S:
        return f"unresponsive: no heartbeat for {now - state.heard_at:.0f} s"
    return None


def process_state(pid: int) -> str | None:
    """A process's state letter from /proc (Linux): 'T' when stopped by a signal; None if unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def dump_stacks_if_hung(ranks: list[RankState], now: float, hang_timeout: float) -> bool:
    """If some rank hangs: ask every live rank for its stacks (faulthandler, on SIGUSR1) and say so."""
    if not hung_ranks(ranks, now, hang_timeout):
        return False
    for state in ranks:
        if state.returncode is None:
            signal_process(state.process.pid, signal.SIGUSR1)
    return True
