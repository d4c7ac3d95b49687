"""The cost model's arithmetic: step time, throughput, speed-up and
efficiency of a config at any world size, from a :class:`Calibration` of this
machine and a network (``ddlkit.network``). Pure functions: nothing here
launches anything (``ddlkit.costmodel`` measures a calibration and draws).

A step is compute plus communication, not overlapped (ddlkit's emulated
network blocks the calling rank the same way):

- compute: ``overhead + per_sample * samples`` a rank computes in the step;
- communication: each operation's alpha-beta time on the network (``ddlkit.network``),
  plus, with ``emulated=True`` (a run on this machine), what loopback itself takes
  (the calibrated all-reduce and point-to-point fits) and, for ``data``, what a
  DDP step of two ranks side by side took beyond that and one rank's compute
  (``Calibration.ddp_overhead_s``: DDP's hooks and bucket copies, two ranks
  sharing the machine's cores and memory).

>>> cal = Calibration(1e-4, 1e9, 1e-4, 2e9, per_sample_s=1e-4, overhead_s=1e-3, shapes=((1000, 1000),))
>>> table = predict(cal, "data", [1, 2, 4], batch_size=64, network="1gbe", emulated=False)
>>> table["world_size"].tolist(), round(float(table["speedup"].iloc[0]), 3)
([1, 2, 4], 1.0)
>>> best_world_size(cal, "data", batch_size=64, network="1gbe", emulated=False)
1
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from .network import Link, link_of, op_seconds


@dataclass(frozen=True)
class Calibration:
    """What ``ddlkit.costmodel.calibrate`` measured: loopback point-to-point
    (latency, bytes/s), loopback ring all-reduce (latency per message, bytes/s),
    a config's compute per sample and per step, and its parameters' shapes."""

    p2p_latency_s: float
    p2p_bandwidth_Bps: float  # noqa: N815
    allreduce_latency_s: float
    allreduce_bandwidth_Bps: float  # noqa: N815
    per_sample_s: float
    overhead_s: float
    shapes: tuple[tuple[int, ...], ...] = ()
    activation_floats: int = 128  # per sample, at a pipeline stage boundary
    ddp_overhead_s: float = 0.0  # a 2-rank DDP step on this machine, less compute and loopback's all-reduce
    measured: dict[str, Any] = field(default_factory=dict, compare=False)  # the raw measurements

    @property
    def param_count(self) -> int:
        return sum(math.prod(shape) for shape in self.shapes)


@dataclass(frozen=True)
class Cluster:
    """Workers in nodes of ``per_node`` on the ``inner`` link, nodes joined by ``outer``."""

    about: str
    per_node: int
    inner: str
    outer: str

    def link(self, world_size: int) -> Link | None:
        """A ring across nodes runs at the speed of its slowest hop."""
        return link_of(self.inner if world_size <= self.per_node else self.outer)


CLUSTERS = {
    "nvlink": Cluster("8 GPUs on NVLink (one node)", 8, "nvlink", "nvlink"),
    "infiniband": Cluster("nodes of 8 GPUs on NVLink, InfiniBand between", 8, "nvlink", "infiniband"),
    "10gbe": Cluster("nodes of 8 GPUs on NVLink, 10 GbE between", 8, "nvlink", "10gbe"),
    "wan": Cluster("nodes of 8 GPUs on NVLink, a WAN between sites", 8, "nvlink", "wan"),
}
STRATEGIES = ("single", "data", "ps", "pipeline", "local_sgd", "federated")


def _ops(cal: Calibration, strategy: str, n: int, knobs: dict[str, Any]) -> list[tuple[str, float, int]]:
    """(kind, payload bytes, times per step) of one rank's communication in one step."""
    grads = cal.param_count * 4
    if strategy in ("single",) or n < 2:
        return []
    if strategy == "data":
        return _compressed(cal, knobs)
    if strategy == "local_sgd":
        return [("allreduce", grads, 1 / knobs.get("sync_every", 10))]
    if strategy == "ps":  # the server's one link carries every worker's push and pull, one after another
        return [("send", grads, 2 * (n - 1))]
    if strategy == "pipeline":  # activations forward and gradients back, per micro-batch and boundary
        micro = knobs.get("micro_batches", 4)
        per_micro = knobs["batch_size"] / micro * cal.activation_floats * 4
        return [("send", per_micro, 2 * (micro + n - 2))]
    if strategy == "federated":  # per round: the model out to each client and its update back, through the server
        return [("send", grads, 2 * knobs.get("clients_per_round", n - 1))]
    raise ValueError(f"strategy={strategy!r} is invalid for the cost model: valid values are {list(STRATEGIES)}")


def _compressed(cal: Calibration, knobs: dict[str, Any]) -> list[tuple[str, float, int]]:
    """The operations of DDP's communication hook (``ddlkit.strategies.compression``), one bucket."""
    kind, count = knobs.get("compression", "none"), cal.param_count
    if kind in ("fp16", "bf16"):
        return [("allreduce", count * 2, 1)]
    if kind == "topk":
        k = max(1, math.ceil(knobs.get("topk_ratio", 0.01) * count))
        return [("allgather", k * 4, 2)]  # values and int32 indices
    if kind == "powersgd":
        rank, plain, p, q = knobs.get("powersgd_rank", 2), 0, 0, 0
        for shape in cal.shapes:
            rows, cols = shape[0], math.prod(shape[1:]) if len(shape) > 1 else 1
            if len(shape) > 1 and rows * cols >= 2 * rank * (rows + cols):  # torch's min_compression_rate 2
                p, q = p + rows * rank, q + cols * rank
            else:
                plain += rows * cols
        return [("allreduce", 4 * size, 1) for size in (plain, p, q) if size]
    return [("allreduce", count * 4, 1)]


def _loopback(cal: Calibration, kind: str, payload: float, n: int) -> float:
    """What this machine's loopback itself takes for one operation (the calibrated fits)."""
    if kind == "allreduce" or kind == "allgather":
        link = Link(cal.allreduce_latency_s, cal.allreduce_bandwidth_Bps)
    else:
        link = Link(cal.p2p_latency_s, cal.p2p_bandwidth_Bps)
    return op_seconds(kind, int(payload), n, link)


def step_seconds(
    cal: Calibration, strategy: str, n: int, batch_size: float, knobs: dict[str, Any], link: Link | None, emulated: bool
) -> dict[str, float]:
    """Compute, communication and step seconds of one step at world size ``n`` (``batch_size`` per replica)."""
    accumulation = knobs.get("grad_accumulation", 1)
    if strategy == "pipeline":  # (m + n - 1) slots of one micro-batch on one stage: the bubble
        micro = knobs.get("micro_batches", 4)
        compute = cal.overhead_s + cal.per_sample_s * batch_size / micro / n * (micro + n - 1)
    else:
        compute = cal.overhead_s + cal.per_sample_s * batch_size * accumulation
    comm = 0.0
    for kind, payload, times in _ops(cal, strategy, n, {**knobs, "batch_size": batch_size}):
        each = op_seconds(kind, int(payload), n, link) + (_loopback(cal, kind, payload, n) if emulated else 0.0)
        comm += times * each
    if strategy == "data" and n > 1 and emulated:
        comm += cal.ddp_overhead_s
    return {"compute_s": compute, "comm_s": comm, "step_s": compute + comm}


def predict(
    cal: Calibration,
    strategy: str,
    world_sizes: Sequence[int],
    batch_size: int,
    network: Any = "loopback",
    batch: str = "global",
    emulated: bool = True,
    cluster: str | None = None,
    **knobs: Any,
) -> pd.DataFrame:
    """One row per world size: step time, its compute and communication,
    samples/s, speed-up over the first size and efficiency. ``batch``:
    "global": ``batch_size`` is the global batch, split over the replicas;
    "per_rank": ``batch_size`` a replica. ``cluster`` (a key of
    :data:`CLUSTERS`) picks the link by world size instead of ``network``."""
    rows = []
    for n in world_sizes:
        replicas = _replicas(strategy, n)
        per_replica = batch_size / replicas if batch == "global" else batch_size
        link = CLUSTERS[cluster].link(n) if cluster else link_of(network)
        times = step_seconds(cal, strategy, n, per_replica, knobs, link, emulated)
        samples = per_replica * replicas * knobs.get("grad_accumulation", 1)
        rows.append({"world_size": n, "batch_per_replica": per_replica, **times})
        rows[-1]["samples_per_s"] = samples / times["step_s"]
    table = pd.DataFrame(rows)
    table["speedup"] = table["samples_per_s"] / table["samples_per_s"].iloc[0]
    table["efficiency"] = table["speedup"] / (table["world_size"] / table["world_size"].iloc[0])
    return table


def _replicas(strategy: str, n: int) -> int:
    """Ranks that each take a share of the data."""
    if strategy == "pipeline":
        return 1
    if strategy in ("ps", "federated"):
        return max(1, n - 1)  # one serving rank
    return n


def best_world_size(
    cal: Calibration,
    strategy: str,
    batch_size: int,
    network: Any = "loopback",
    max_workers: int = 1024,
    tolerance: float = 0.05,
    **options: Any,
) -> int:
    """Where adding workers stops paying: the smallest power-of-two world size
    (up to ``max_workers``) whose throughput is within ``tolerance`` of the best
    (``batch_size``: the global batch, unless ``batch="per_rank"``)."""
    sizes = [2**i for i in range(int(math.log2(max_workers)) + 1)]
    table = predict(cal, strategy, sizes, batch_size, network, **options)
    best = table["samples_per_s"].max()
    return int(table[table["samples_per_s"] >= (1 - tolerance) * best]["world_size"].iloc[0])
