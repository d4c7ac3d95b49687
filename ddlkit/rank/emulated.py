"""Emulated networks: one process-group backend that every strategy goes through.

A rank of a CPU run joins its process group with the backend ``"emulated"``:
a ``torch.distributed.ProcessGroup`` that holds a real gloo group and passes
every operation on to it. Before it does, it sleeps the time the alpha-beta
model (``ddlkit.network``) gives for that operation's bytes, algorithm and
group size on the current link, so each call takes the real loopback time plus
the model's. Every strategy's communication goes through a process group (DDP's
bucket all-reduces, FSDP2's all-gathers and reduce-scatters, DTensor's
functional collectives, pipeline sends, the parameter server's and federated
sends and receives, and the sub-groups of a DeviceMesh), so none of them knows.

Why a backend and not a ``TorchDispatchMode`` like ``ddlkit.rank.comm``: a
dispatch mode sees every tensor operation, and its Python call cost ~15 us per
op here (0.9 ms on a 2.6 ms DDP step), which would be counted as compute; the
backend only runs Python for communication.

The time is spent on the calling thread before the operation starts: a
transfer blocks that rank as a synchronous one would (overlap of computation
with the emulated part is not modelled). A receive costs nothing extra: its
sender paid. ``NETWORK`` counts, per process, the operations, their payload and
wire bytes and the modelled seconds; ddlkit's own control traffic (agreeing on
live controls) runs :func:`unmetered`.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..network import Link, op_seconds, wire_bytes
from .comm import nbytes

BACKEND = "emulated"


@dataclass
class NetworkState:
    """The link in force in this process, and what went over it."""

    link: Link | None = None
    calls: int = 0
    payload_bytes: int = 0
    wire_bytes: int = 0
    seconds: float = 0.0  # modelled (and slept)

    def charge(self, kind: str, payload: int, n: int) -> None:
        if getattr(_local, "unmetered", False) or n < 2:
            return
        self.calls += 1
        self.payload_bytes += payload if kind != "recv" else 0
        self.wire_bytes += wire_bytes(kind, payload, n)
        seconds = op_seconds(kind, payload, n, self.link)
        self.seconds += seconds
        if seconds > 0:
            time.sleep(seconds)

    def totals(self) -> dict[str, float]:
        return {"payload_bytes": self.payload_bytes, "wire_bytes": self.wire_bytes, "network_s": self.seconds}


NETWORK = NetworkState()
_local = threading.local()


@contextmanager
def unmetered() -> Iterator[None]:
    """Communication inside is neither delayed nor counted (ddlkit's own control traffic)."""
    _local.unmetered = True
    try:
        yield
    finally:
        _local.unmetered = False


# Each ProcessGroup method that communicates: (kind of algorithm, index of the argument holding this rank's payload).
_OPS = {
    "allreduce": ("allreduce", 0),
    "allreduce_coalesced": ("allreduce", 0),
    "broadcast": ("broadcast", 0),
    "reduce": ("reduce", 0),
    "allgather": ("allgather", 1),
    "_allgather_base": ("allgather", 1),
    "all_gather_single": ("allgather", 1),
    "allgather_coalesced": ("allgather", 1),
    "allgather_into_tensor_coalesced": ("allgather", 1),
    "all_gather_single_coalesced": ("allgather", 1),
    "reduce_scatter": ("reduce_scatter", 1),
    "_reduce_scatter_base": ("reduce_scatter", 1),
    "reduce_scatter_single": ("reduce_scatter", 1),
    "reduce_scatter_tensor_coalesced": ("reduce_scatter", 1),
    "reduce_scatter_single_coalesced": ("reduce_scatter", 1),
    "alltoall": ("alltoall", 1),
    "alltoall_base": ("alltoall", 1),
    "all_to_all_single": ("alltoall", 1),
    "gather": ("gather", 1),
    "scatter": ("scatter", 1),
    "send": ("send", 0),
    "recv": ("recv", 0),
    "recv_anysource": ("recv", 0),
    "barrier": ("barrier", -1),
    "monitored_barrier": ("barrier", -1),
}


def _forwarding(name: str, kind: str, payload_at: int) -> Callable[..., Any]:
    def method(self: EmulatedGroup, *args: Any, **kwargs: Any) -> Any:
        given = [*args, *kwargs.values()]  # torch passes some by keyword (barrier(opts=...))
        NETWORK.charge(kind, nbytes(given[payload_at]) if 0 <= payload_at < len(given) else 0, self.inner.size())
        return getattr(self.inner, name)(*args, **kwargs)

    method.__name__ = name
    return method


class EmulatedGroup(dist.ProcessGroup):
    """A process group that delays, then hands each operation to a real one."""

    def __init__(self, inner: dist.ProcessGroup):
        super().__init__(inner.rank(), inner.size())  # type: ignore[call-arg]  # torch's (rank, size) form
        self.inner = inner
        self._name = ""

    def getBackendName(self) -> str:  # noqa: N802 (torch's name)
        return BACKEND

    def _set_group_name(self, name: Any) -> None:
        self._name = name
        self.inner._set_group_name(name)

    @property
    def group_name(self) -> Any:  # torch's functional collectives find the group by it
        return self._name

    def size(self) -> int:
        return self.inner.size()

    def rank(self) -> int:
        return self.inner.rank()


for _name, (_kind, _at) in _OPS.items():
    setattr(EmulatedGroup, _name, _forwarding(_name, _kind, _at))


GLOO_THREADS = 8  # torch's PowerSGD hook blocks one gloo thread per bucket in a callback: gloo's default 2 deadlocked


def gloo_devices() -> list[Any]:
    """The interfaces gloo would use by itself: those GLOO_SOCKET_IFNAME names
    (a node's veth, ddlkit's own ``lo``), else the one the hostname resolves to."""
    names = [name for name in os.environ.get("GLOO_SOCKET_IFNAME", "").split(",") if name]
    if not names:
        return [dist.ProcessGroupGloo.create_default_device()]
    return [dist.ProcessGroupGloo.create_device(interface=name) for name in names]


def _create(options: Any, backend_options: Any) -> EmulatedGroup:
    """The backend's factory (torch's ``extended_api``): a gloo group inside ours."""
    gloo_options = dist.ProcessGroupGloo._Options()  # type: ignore[attr-defined]  # torch's, not in its stubs
    gloo_options._timeout = options.timeout
    gloo_options._devices = gloo_devices()
    setattr(gloo_options, "_threads", GLOO_THREADS)  # noqa: B010 (torch's option; ddlkit has a private `_threads`)
    gloo = dist.ProcessGroupGloo(options.store, options.group_rank, options.group_size, gloo_options)
    inner = dist.ProcessGroup(options.store, options.group_rank, options.group_size)
    inner._register_backend(torch.device("cpu"), dist.ProcessGroup.BackendType.GLOO, gloo)
    inner._set_default_backend(dist.ProcessGroup.BackendType.GLOO)
    return EmulatedGroup(inner)


def register() -> str:
    """Make the backend known to ``torch.distributed`` (once); returns its name."""
    if BACKEND not in dist.Backend.backend_list:
        dist.Backend.register_backend(BACKEND, _create, extended_api=True, devices=["cpu"])
    return BACKEND
