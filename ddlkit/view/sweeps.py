"""Speedup sweeps: the same experiment at several world sizes, one after the
other, measured against the first. (The module is ``sweeps`` so that
``ddlkit.sweep`` stays the function.)

Batch semantics are explicit, because they decide what "the same experiment"
means:

- ``batch="global"`` (strong scaling, the default): the global batch of
  ``cfg`` (``batch_size * world_size``) is kept, and split over the ranks. Every
  size computes the same updates (data parallelism is large-batch training), so
  a speedup is the same work done faster.
- ``batch="per_rank"`` (weak scaling): every rank keeps ``cfg.batch_size``; the
  global batch grows with the ranks, and so does the work per step.

Threads are explicit too: by default every rank gets one thread at every size
(``threads=1``), so one rank uses one core and N ranks N cores, and a speedup
compares like with like (with ``threads=None`` one rank gets every core as
intra-op threads, which on small models and busy machines is its own,
often poor, parallelism). On a machine with fewer cores than ranks the ranks
share cores: the table says so (``cores_per_rank``, ``oversubscribed``) rather
than hiding it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from ..config import RunConfig
from ..kernel.launch import launch
from ..kernel.run import Run
from . import costmodel, figures

BATCH_MODES = ("global", "per_rank")
SMOOTH_STEPS = 10  # the loss is averaged over this many steps before comparing it with the target


@dataclass
class SweepResult:
    """``table``: one row per world size; ``figure``: loss against time and
    measured speedup against ideal; ``runs``: the runs, in order."""

    table: pd.DataFrame
    figure: go.Figure
    runs: list[Run]

    def _repr_html_(self) -> str:
        return self.table.to_html(index=False, float_format=lambda v: f"{v:.3g}")


def sweep(
    cfg: RunConfig,
    world_sizes: Sequence[int] = (1, 2, 4),
    batch: str = "global",
    threads: int | None = 1,
    target_loss: float | None = None,
    timeout: float = 600,
    calibration: costmodel.Calibration | None = None,
) -> SweepResult:
    """Run ``cfg`` at each world size, one run after the other.

    ``target_loss``: for the time-to-target column; by default the highest
    smoothed final loss of the runs, which every run reaches. ``calibration``
    (``ddlkit.costmodel.calibrate``): the cost model's prediction joins the
    table (``predicted_samples_per_s``, ``predicted_speedup``, ``error_ratio``
    = measured / predicted) and the speed-up panel (dashed).

    Example (it runs the experiment twice, so it is no doctest)::

        result = ddlkit.sweep(ddlkit.RunConfig(strategy="data", world_size=1, batch_size=32, steps=20),
                              world_sizes=[1, 2])
        list(result.table["world_size"]), result.table["speedup"].iloc[0]   # ([1, 2], 1.0)
    """
    configs = [config_at(cfg, size, batch).replace(threads=threads) for size in world_sizes]
    for config in configs:  # every size is refused before the first starts
        config.validate()
    runs = [launch(config, echo=False).wait(timeout) for config in configs]
    data = [figures.RunData(run, figures.COLORS[i % len(figures.COLORS)]) for i, run in enumerate(runs)]
    target = target_loss if target_loss is not None else max(_smoothed_loss(d)[1][-1] for d in data)
    cores = len(os.sched_getaffinity(0))
    base_rate, base_size = data[0].samples_per_s(), world_sizes[0]
    rows = []
    for config, d in zip(configs, data, strict=True):
        size = config.world_size
        speedup = d.samples_per_s() / base_rate
        rows.append(
            {
                "world_size": size,
                "batch_per_rank": config.batch_size,
                "threads_per_rank": config.threads,
                "global_batch": config.batch_size * size,
                "samples_per_s": d.samples_per_s(),
                "time_to_target_s": _time_to(d, target),
                "speedup": speedup,
                "efficiency": speedup / (size / base_size),
                "cores_per_rank": cores / size,
                "oversubscribed": size > cores,
                "final_loss": _smoothed_loss(d)[1][-1],
                "run_id": d.run.id,
            }
        )
    table = pd.DataFrame(rows)
    table.attrs.update(target_loss=target, batch=batch, cores=cores)
    figure = figures.figure(runs, baseline=runs[0], keys=["loss_time", "speedup"])
    figure.update_layout(title=f"sweep over {list(world_sizes)} ranks ({batch} batch kept), {cores} cores")
    if calibration is not None:
        table = costmodel.overlay(table, figure, cfg, calibration, batch)
    return SweepResult(table, figure, runs)


def config_at(cfg: RunConfig, size: int, batch: str) -> RunConfig:
    if batch not in BATCH_MODES:
        raise ValueError(f"batch={batch!r} is invalid: valid values are {list(BATCH_MODES)}")
    if batch == "per_rank":
        return cfg.replace(world_size=size)
    global_batch = cfg.batch_size * cfg.world_size
    if global_batch % size:
        raise ValueError(
            f"world size {size} cannot split the global batch of {global_batch} evenly: "
            f"use world sizes that divide it, or batch='per_rank'"
        )
    return cfg.replace(world_size=size, batch_size=global_batch // size)


def _smoothed_loss(data: figures.RunData) -> tuple[np.ndarray, np.ndarray]:
    steps = data.steps(complete=True)
    loss = pd.Series(data.mean("loss_sum", steps)).rolling(SMOOTH_STEPS, min_periods=1).mean().to_numpy()
    return steps, loss


def _time_to(data: figures.RunData, target: float) -> float:
    """Seconds from the end of the first step to the first step whose smoothed
    loss is at or below ``target`` (start-up excluded)."""
    steps, loss = _smoothed_loss(data)
    reached = np.flatnonzero(loss <= target)
    if not len(reached):
        return math.nan
    times = data.per_step.arrays["time_max"][steps]
    return float(times[reached[0]] - times[0])
