"""Joining the process group of one attempt, and leaving it together.

When a rank dies (or hangs) and ``max_restarts`` allows, the kernel ends
every rank and starts all of them again (as torchrun does), attempt n+1. All
attempts meet at the kernel's one rendezvous store, but in torch 2.13 ranks
under an agent store all use the same keys (``default_pg/...``): a restarted
rank would read the dead attempt's addresses and fail to connect ("Connection
refused") or hang. So every attempt joins its group under its own
``PrefixStore("/attempt_<n>", store)`` (FIELD-NOTES: 10/10 clean restarts
that way), with a timeout. CPU ranks use the ``emulated`` backend
(``ddlkit.rank.emulated``): gloo, with the config's network delays added.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch.distributed as dist

from .emulated import register as emulated_backend
from .faults import attempt_number

LEAVE_TIMEOUT_S = 60.0  # how long a finished rank waits for its peers to finish too


def join_attempt_group(device: str, timeout: timedelta) -> None:
    """Initialise this rank's default process group under the attempt's own
    store prefix (accelerate then uses it as it is). Only under ddlkit's or
    torchrun's agent store, with more than one rank."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size < 2 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or dist.is_initialized():
        return
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout)
    dist.init_process_group(
        "nccl" if device == "cuda" else emulated_backend(),  # gloo, behind the emulated network
        timeout=timeout,
        world_size=world_size,
        rank=int(os.environ["RANK"]),
        store=dist.PrefixStore(f"/attempt_{attempt_number()}", store),
    )


def leave_group() -> None:
    """Destroy this rank's default process group once every rank is done with
    it (each sets a key in the group's store, then waits for all of them).
    gloo may still be completing a slow rank's connections to the others when
    a fast one, whose function did nothing after joining, tears its side down:
    the slow one then fails with "Connection closed by peer" (seen in CI: 3
    ranks on 2 cores, a plain ``Accelerator()``). A peer that never arrives
    (it failed, and the kernel ends the run) holds the others at most
    ``LEAVE_TIMEOUT_S``. The store, not a collective: a rank whose function
    returned early must not meet its peers' next collective."""
    if not dist.is_initialized():
        return
    ranks = dist.get_world_size()
    if ranks > 1:
        store = dist.distributed_c10d._get_default_store()
        store.set(f"ddlkit/left/{dist.get_rank()}", "1")
        try:
            store.wait([f"ddlkit/left/{r}" for r in range(ranks)], timedelta(seconds=LEAVE_TIMEOUT_S))
        except RuntimeError:  # timed out, or the store went away: leave anyway
            pass
    dist.destroy_process_group()
