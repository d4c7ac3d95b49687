"""Measuring this machine's communication, in the ranks of a calibration run
(``ddlkit.costmodel.calibrate`` launches :func:`measure` as a function).

Ping-pong between ranks 0 and 1 (half a round trip: one message) and ring
all-reduces on every rank, over message sizes; the lower quartile of repeated
timings, after a warm-up: on a shared machine a busy moment slows some
samples a lot, and the quartile keeps what the transfer itself costs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta
from statistics import quantiles

import torch
import torch.distributed as dist

from .group import join_attempt_group

WARMUP = 3


def measure(sizes: list[int], repeats: int) -> dict[str, list[float]]:
    """Seconds per message (ping-pong, ranks 0 and 1) and per all-reduce (every
    rank) for float32 buffers of each size in bytes; returned by rank 0."""
    join_attempt_group("cpu", timedelta(seconds=120))
    rank, n = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    one_way, allreduce = [], []
    _ping_pong(torch.ones(1024), rank, 10)  # the first messages also set up connections
    for size in sizes:
        buffer = torch.ones(max(1, size // 4))
        one_way.append(_ping_pong(buffer, rank, repeats) / 2)
        allreduce.append(_timed(lambda: dist.all_reduce(buffer), repeats))  # noqa: B023 (timed right here)
    result = {"sizes": [float(s) for s in sizes], "one_way_s": one_way, "allreduce_s": allreduce, "ranks": [float(n)]}
    dist.destroy_process_group()
    return result if rank == 0 else {}


def _ping_pong(buffer: torch.Tensor, rank: int, repeats: int) -> float:
    def once() -> None:
        if rank == 0:
            dist.send(buffer, 1)
            dist.recv(buffer, 1)
        elif rank == 1:
            dist.recv(buffer, 0)
            dist.send(buffer, 0)

    return _timed(once, repeats)


def _timed(operation: Callable[[], object], repeats: int) -> float:
    """The lower quartile of ``operation``'s seconds, every rank starting together."""
    samples = []
    for i in range(WARMUP + repeats):
        dist.barrier()
        start = time.perf_counter()
        operation()
        if i >= WARMUP:
            samples.append(time.perf_counter() - start)
    return float(quantiles(samples, n=4)[0])
