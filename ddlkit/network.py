"""Networks as the alpha-beta model sees them: a latency per message (alpha)
and a bandwidth (1/beta), and what one collective or message costs on them.

``network=`` in a RunConfig is a preset name or ``{"latency_ms": ..., "bandwidth_gbps": ...}``.
The rank side (``ddlkit.rank.emulated``) sleeps :func:`op_seconds` before every
collective and point-to-point message, on top of what loopback really takes;
the cost model (``ddlkit.costmodel``) uses the same formulas to predict.

Per rank, for a payload of ``b`` bytes in a group of ``n`` (ring algorithms,
as NCCL and gloo use for large buffers):

- all-reduce: ``2(n-1)`` messages, ``2(n-1)/n * b`` bytes;
- all-gather (``b`` = this rank's input) and reduce-scatter (``b`` = the full
  buffer): ``n-1`` messages, ``(n-1)/n`` of the full buffer;
- broadcast and a send: one message of ``b`` bytes (a receive costs its sender).

>>> link = link_of("1gbe")
>>> round(op_seconds("allreduce", 1_000_000, 2, link) * 1e3, 3)  # 2 latencies + 1 MB at 125 MB/s
8.2
>>> wire_bytes("allreduce", 1000, 4), wire_bytes("allgather", 1000, 4), wire_bytes("send", 1000, 4)
(1500, 3000, 1000)
>>> link_of({"latency_ms": -1, "bandwidth_gbps": 1})
Traceback (most recent call last):
...
ValueError: network latency_ms=-1 is invalid: it must be a number >= 0 (milliseconds per message)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .knobs import choice_problem, is_number


@dataclass(frozen=True)
class Link:
    """One link: seconds per message and bytes per second."""

    latency_s: float
    bandwidth_Bps: float  # noqa: N815 (bytes, not bits)

    @property
    def bandwidth_gbps(self) -> float:
        return self.bandwidth_Bps * 8 / 1e9


def gbps(latency_ms: float, bandwidth_gbps: float) -> Link:
    return Link(latency_ms / 1e3, bandwidth_gbps * 1e9 / 8)


# None: nothing is added to what loopback takes. The others are typical figures
# (per message latency, per direction bandwidth) for each kind of link.
PRESETS: dict[str, Link | None] = {
    "loopback": None,
    "nvlink": gbps(0.005, 2400.0),  # NVLink 3 within a node: ~300 GB/s, microseconds
    "infiniband": gbps(0.005, 200.0),  # HDR InfiniBand between nodes
    "10gbe": gbps(0.05, 10.0),
    "1gbe": gbps(0.1, 1.0),
    "wan": gbps(25.0, 0.1),  # across regions: 25 ms, 100 Mbit/s
}
KEYS = ("latency_ms", "bandwidth_gbps")
VALID = f"one of {list(PRESETS)} or a dict {{'latency_ms': >= 0, 'bandwidth_gbps': > 0}}"


def link_of(network: Any) -> Link | None:
    """The link a ``network`` value means (None: loopback, nothing added); one
    ValueError for anything else."""
    if isinstance(network, str):
        message = choice_problem("network", network, list(PRESETS))
        if message:
            raise ValueError(f"{message} or a dict {{'latency_ms': ..., 'bandwidth_gbps': ...}}")
        return PRESETS[network]
    if not isinstance(network, dict) or set(network) != set(KEYS):
        raise ValueError(f"network={network!r} is invalid: it must be {VALID}")
    latency, bandwidth = network["latency_ms"], network["bandwidth_gbps"]
    if not is_number(latency) or latency < 0:
        raise ValueError(
            f"network latency_ms={latency!r} is invalid: it must be a number >= 0 (milliseconds per message)"
        )
    if not is_number(bandwidth) or bandwidth <= 0:
        raise ValueError(f"network bandwidth_gbps={bandwidth!r} is invalid: it must be a number > 0 (Gbit/s)")
    return gbps(latency, bandwidth)


def problem(network: Any, device: str = "cpu") -> str | None:
    """The error message for a ``network`` value on ranks of ``device``, or None if valid."""
    try:
        link = link_of(network)
    except ValueError as exc:
        return str(exc)
    if link is not None and device == "cuda":
        return (
            f"network={network!r} is invalid on device='cuda': networks are emulated on CPU ranks (gloo); "
            "on GPUs measure the real one (network='loopback') or use device='cpu'"
        )
    return None


def name_of(network: Any) -> str:
    """A short label: the preset's name, or '0.1 ms / 1 Gbit/s'."""
    if isinstance(network, str):
        return network
    return f"{network['latency_ms']:g} ms / {network['bandwidth_gbps']:g} Gbit/s"


# The algorithm of each kind of operation: (messages, bytes as a multiple of the payload), for group size n.
def _shape(kind: str, n: int) -> tuple[int, float]:
    if n < 2 or kind == "recv":
        return 0, 0.0
    if kind == "allreduce":
        return 2 * (n - 1), 2 * (n - 1) / n
    if kind == "allgather":  # the payload is this rank's part; it receives the other n-1 parts
        return n - 1, float(n - 1)
    if kind in ("reduce_scatter", "alltoall", "gather", "scatter", "reduce"):  # the payload is the full buffer
        return n - 1, (n - 1) / n
    if kind == "barrier":
        return 2 * (n - 1), 0.0
    return 1, 1.0  # broadcast, send


def wire_bytes(kind: str, payload: int, n: int) -> int:
    """Bytes one rank moves for an operation of ``kind`` on ``payload`` bytes in a group of ``n``."""
    return int(round(_shape(kind, n)[1] * payload))


def op_seconds(kind: str, payload: int, n: int, link: Link | None) -> float:
    """What the alpha-beta model gives for one operation (0 on loopback)."""
    if link is None:
        return 0.0
    messages, factor = _shape(kind, n)
    return messages * link.latency_s + factor * payload / link.bandwidth_Bps


def allreduce_seconds(payload: int, n: int, link: Link | None) -> float:
    """A ring all-reduce of ``payload`` bytes on ``n`` ranks."""
    return op_seconds("allreduce", payload, n, link)
