"""Measuring this machine's communication, in the ranks of a calibration run
(``ddlkit.costmodel.calibrate`` launches :func:`measure` as a function).

Ping-pong between ranks 0 and 1 (half a round trip: one message) and ring
all-reduces on every rank, over message sizes; the lower quartile of repeated
timings, after a warm-up: on a shared machine a busy moment slows some
samples a lot, and the quartile keeps what the transfer itself costs. The
sizes take turns, one timing each per round: a slower minute of the machine
then slows every size alike, where measuring one size after another moved
single points by 20-40 % and bent the fitted line.
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
    buffers = [torch.ones(max(1, size // 4)) for size in sizes]
    one_way: list[list[float]] = [[] for _ in sizes]
    allreduce: list[list[float]] = [[] for _ in sizes]
    for _ in range(10):  # the first messages also set up connections
        _ping_pong(buffers[0], rank)
    for round_ in range(WARMUP + repeats):
        for buffer, messages, reductions in zip(buffers, one_way, allreduce, strict=True):
            ping_pong_s = _timed(lambda: _ping_pong(buffer, rank))  # noqa: B023 (timed right here)
            allreduce_s = _timed(lambda: dist.all_reduce(buffer))  # noqa: B023
            if round_ >= WARMUP:
                messages.append(ping_pong_s / 2)
                reductions.append(allreduce_s)
    result = {
        "sizes": [float(s) for s in sizes],
        "one_way_s": [lower_quartile(samples) for samples in one_way],
        "allreduce_s": [lower_quartile(samples) for samples in allreduce],
        "ranks": [float(n)],
    }
    dist.destroy_process_group()
    return result if rank == 0 else {}


def _ping_pong(buffer: torch.Tensor, rank: int) -> None:
    if rank == 0:
        dist.send(buffer, 1)
        dist.recv(buffer, 1)
    elif rank == 1:
        dist.recv(buffer, 0)
        dist.send(buffer, 0)


def _timed(operation: Callable[[], object]) -> float:
    """``operation``'s seconds, every rank starting together."""
    dist.barrier()
    start = time.perf_counter()
    operation()
    return time.perf_counter() - start


def lower_quartile(samples: list[float]) -> float:
    return float(quantiles(samples, n=4)[0])
