"""Failing on purpose, the ways real workers fail (teaching and tests).

``RunConfig.fault`` aims a fault at a rank, a step and an attempt; the rank
loop fires it when that rank reaches that step (``ddlkit.rank.loop``).

>>> from ddlkit.config import RunConfig
>>> faults_for(RunConfig(fault={"rank": 1, "step": 5, "kind": "exit"}), rank=1, attempt=0)
{5: 'exit'}
"""

from __future__ import annotations

import os
import signal
import time

from ..config import RunConfig


def attempt_number() -> int:
    """Which attempt this rank belongs to (0, then 1, 2, ... after each restart)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def faults_for(cfg: RunConfig, rank: int, attempt: int) -> dict[int, str]:
    """{step: kind} of the faults this rank injects in this attempt."""
    return {int(f["step"]): f["kind"] for f in cfg.faults() if f["rank"] == rank and f.get("attempt", 0) == attempt}


def inject_fault(kind: str, step: int) -> None:
    """Raise, exit, die by SIGKILL, freeze (SIGSTOP) or hang, as ``kind`` says."""
    if kind == "exception":
        raise RuntimeError(f"injected fault at step {step}")
    if kind == "exit":
        os._exit(3)
    if kind == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "sigstop":  # frozen, every thread: no step, no heartbeat
        os.kill(os.getpid(), signal.SIGSTOP)
    while kind == "hang":
        time.sleep(1)
