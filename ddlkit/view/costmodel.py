"""The cost model: calibrate on this machine, predict any world size on any
network, and find where adding workers stops paying.

- :func:`calibrate` measures this machine's loopback (ping-pong and ring
  all-reduce over message sizes, in calibration runs of 2 ranks or more) and
  a config's compute per sample and per step (short single-rank runs at three
  batch sizes), and fits the alpha-beta and linear models (``ddlkit.scaling``);
  then a short 2-rank ``data`` run of the config on loopback gives what a DDP
  step here costs beyond those (``Calibration.ddp_overhead_s``).
- :func:`predict` gives step time, compute, communication, throughput,
  speed-up and efficiency of a config at world sizes, on a network (emulated
  here: plus loopback's own time) or on a cluster preset (``CLUSTERS``:
  8 GPUs on NVLink, nodes on InfiniBand, 10 GbE, WAN) up to 1,024 workers.
- :func:`best_world_size` names where the throughput stops growing.
- ``ddlkit.sweep(cfg, ..., calibration=cal)`` puts the prediction beside the
  measurement; :func:`figure` draws predicted speed-up curves.

Example (it launches calibration runs, so it is no doctest)::

    cal = ddlkit.costmodel.calibrate(cfg)
    ddlkit.costmodel.predict(cfg, [1, 2, 4], network="1gbe", calibration=cal)
    ddlkit.costmodel.best_world_size(cfg, cluster="10gbe", calibration=cal)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from .. import registry, scaling
from ..config import RunConfig
from ..data import load_dataset
from ..kernel.launch import launch
from ..kernel.run import Run
from ..models import build_model
from ..scaling import CLUSTERS, Calibration

# Bytes: the gradients of ddlkit's models (tens of KB to a few MB). Gloo's loopback is near linear up to ~1 MB
# here; a 4 MB message took 14x a 1 MB one (measured), which one line cannot fit.
SIZES = [256, 4_096, 32_768, 131_072, 524_288, 1_048_576]
KNOBS = ("compression", "powersgd_rank", "topk_ratio", "grad_accumulation", "sync_every", "micro_batches")
SKIP_STEPS = 5  # start-up steps left out of the compute fit
DDP_STEPS = 100  # of the 2-rank run: its lower quartile wandered 3.7-5.8 ms over 40 steps, 4.0-4.9 over 100
QUANTILE = 0.25  # of step times: a shared machine slows some steps a lot; the lower quartile is what the code costs
__all__ = ["CLUSTERS", "Calibration", "calibrate", "predict", "best_world_size", "figure"]


def calibrate(
    cfg: RunConfig | None = None,
    sizes: Sequence[int] = SIZES,
    repeats: int = 15,
    process_counts: Sequence[int] = (2,),
    steps: int = 40,
    timeout: float = 300,
) -> Calibration:
    """Measure this machine and ``cfg``'s model (default: a RunConfig())."""
    cfg = cfg or RunConfig()
    sizes, one_way, ring, ranks = list(sizes), [], [], []
    for n in process_counts:
        run = launch(
            "ddlkit.rank.probe:measure", sizes, repeats, num_processes=n, device="cpu", run_dir=cfg.run_dir, echo=False
        )
        got = run.wait(timeout).result().returns[0]
        one_way += got["one_way_s"]
        ring += got["allreduce_s"]
        ranks += [n] * len(sizes)
    all_sizes = np.array(sizes * len(process_counts), dtype=float)
    p2p = _fit(np.ones_like(all_sizes), all_sizes, np.array(one_way))
    group = np.array(ranks, dtype=float)
    allreduce = _fit(2 * (group - 1), 2 * (group - 1) / group * all_sizes, np.array(ring))
    per_sample, overhead, compute = _compute(cfg, steps, timeout)
    model = build_model(cfg.model, load_dataset(cfg.dataset, cfg.seed, cfg.seq_len), cfg.hidden, cfg.seq_len)
    width = cfg.hidden * (cfg.seq_len if cfg.model == "lm" else 1)
    measured = {"sizes": list(all_sizes), "ranks": ranks, "one_way_s": one_way, "allreduce_s": ring, **compute}
    fitted = Calibration(
        p2p[0],
        1 / p2p[1],
        allreduce[0],
        1 / allreduce[1],
        per_sample,
        overhead,
        tuple(tuple(p.shape) for p in model.parameters()),
        width,
        measured=measured,
    )
    return _with_ddp_overhead(fitted, cfg, timeout)


def _fit(messages: np.ndarray, volume: np.ndarray, seconds: np.ndarray) -> tuple[float, float]:
    """Seconds = alpha * messages + volume * beta, least squares in relative error; (alpha, beta), both
    kept positive."""
    design = np.stack([messages, volume], axis=1) / seconds[:, None]
    (alpha, inverse), *_ = np.linalg.lstsq(design, np.ones_like(seconds), rcond=None)
    return max(float(alpha), 1e-7), max(float(inverse), 1e-12)


def _compute(cfg: RunConfig, steps: int, timeout: float) -> tuple[float, float, dict[str, Any]]:
    """Per-sample and per-step seconds of one rank on ``cfg``'s model: single-rank runs at half, one and
    four times its batch, one thread (as ``sweep`` gives each rank), back to back (a shared machine's load
    changes by the minute), fitted by least squares in relative error."""
    batches = [max(1, cfg.batch_size // 2), cfg.batch_size, cfg.batch_size * 4]
    times = []
    for batch in batches:
        single = cfg.for_strategy("single").replace(
            world_size=1, batch_size=batch, steps=steps, threads=1, network="loopback", eval_every=None
        )
        times.append(step_time(launch(single, echo=False).wait(timeout)))
    overhead, inverse = _fit(np.ones(len(batches)), np.array(batches, dtype=float), np.array(times))
    return inverse, overhead, {"batches": batches, "step_s": times}


def _with_ddp_overhead(cal: Calibration, cfg: RunConfig, timeout: float) -> Calibration:
    """``cal`` with the time a 2-rank DDP step of ``cfg`` (its own batch per rank and knobs, on loopback)
    took beyond one rank's compute and the fitted all-reduce: on 2 cores, for the mlp of hidden 512 at
    batch 32, 0.2-3.3 ms of a 3.5-6.4 ms step (DDP's hooks and bucket copies, and two ranks sharing
    cores and memory)."""
    pair = cfg.for_strategy("data").replace(
        world_size=2, steps=DDP_STEPS, threads=1, network="loopback", eval_every=None
    )
    measured = step_time(launch(pair, echo=False).wait(timeout))
    modelled = scaling.step_seconds(cal, "data", 2, cfg.batch_size, knobs_of(pair), None, emulated=True)["step_s"]
    cal.measured["ddp_step_s"] = measured
    return dataclasses.replace(cal, ddp_overhead_s=max(0.0, measured - modelled))


def step_time(run: Run) -> float:
    """A run's typical step: the lower quartile over its steps after start-up of the slowest rank's time."""
    rows = run.metrics[run.metrics["step"] >= SKIP_STEPS]
    return float(rows.groupby("step")["step_time"].max().quantile(QUANTILE))


def predict(
    cfg: RunConfig,
    world_sizes: Sequence[int],
    network: Any = "loopback",
    calibration: Calibration | None = None,
    batch: str = "global",
    cluster: str | None = None,
    emulated: bool | None = None,
) -> pd.DataFrame:
    """Step time (and its parts), samples/s, speed-up and efficiency of ``cfg``
    at each world size; see ``ddlkit.scaling.predict``. ``batch="global"``
    keeps ``cfg``'s global batch (``batch_size`` times its replicas), split;
    "per_rank" keeps ``batch_size`` a replica. ``emulated`` (default: no
    ``cluster`` given): a run on this machine, so loopback's own time is added
    to the network's; on a ``cluster``, or with ``emulated=False``, the
    network is all there is."""
    cal = _need(calibration)
    return scaling.predict(
        cal,
        cfg.strategy,
        world_sizes,
        cfg.batch_size * (registry.get(cfg.strategy).dp_size(cfg) if batch == "global" else 1),
        network,
        batch=batch,
        emulated=cluster is None if emulated is None else emulated,
        cluster=_cluster(cluster),
        **knobs_of(cfg),
    )


def best_world_size(
    cfg: RunConfig,
    network: Any = "loopback",
    calibration: Calibration | None = None,
    max_workers: int = 1024,
    cluster: str | None = None,
    tolerance: float = 0.05,
    emulated: bool | None = None,
) -> int:
    """The smallest power of two up to ``max_workers`` whose predicted throughput is within
    ``tolerance`` of the best: past it, more workers buy (almost) nothing. ``cfg``'s global batch is kept."""
    return scaling.best_world_size(
        _need(calibration),
        cfg.strategy,
        cfg.batch_size * registry.get(cfg.strategy).dp_size(cfg),
        network,
        max_workers=max_workers,
        tolerance=tolerance,
        emulated=cluster is None if emulated is None else emulated,
        cluster=_cluster(cluster),
        **knobs_of(cfg),
    )


def knobs_of(cfg: RunConfig) -> dict[str, Any]:
    """The knobs of ``cfg`` the cost model reads."""
    knobs = {name: getattr(cfg, name) for name in KNOBS}
    if cfg.strategy == "federated":
        knobs["clients_per_round"] = max(1, math.ceil(cfg.clients * cfg.fraction))
    return knobs


def figure(curves: dict[str, pd.DataFrame], title: str = "predicted speed-up") -> go.Figure:
    """Speed-up against world size, one line per labelled prediction, beside the ideal."""
    fig = go.Figure()
    sizes = sorted({int(n) for table in curves.values() for n in table["world_size"]})
    fig.add_trace(go.Scatter(x=sizes, y=sizes, name="ideal", line={"dash": "dot", "color": "grey"}))
    for label, table in curves.items():
        fig.add_trace(go.Scatter(x=table["world_size"], y=table["speedup"], name=label, mode="lines+markers"))
    fig.update_xaxes(type="log", title="workers")
    fig.update_yaxes(type="log", title="speed-up")
    fig.update_layout(title=title, height=420)
    return fig


def overlay(
    table: pd.DataFrame, sweep_figure: go.Figure, cfg: RunConfig, calibration: Calibration, batch: str
) -> pd.DataFrame:
    """A sweep's table with the prediction beside each measurement and their ratio; the predicted
    speed-up drawn (dashed) on the sweep's speed-up panel."""
    predicted = predict(cfg, table["world_size"].tolist(), cfg.network, calibration, batch)
    table = table.copy()
    table["predicted_samples_per_s"] = predicted["samples_per_s"].to_numpy()
    table["predicted_speedup"] = predicted["speedup"].to_numpy()
    table["error_ratio"] = table["samples_per_s"] / table["predicted_samples_per_s"]
    ideal = next(trace for trace in sweep_figure.data if trace.name == "ideal")  # on the speed-up panel's axes
    sweep_figure.add_trace(
        go.Scatter(
            x=table["world_size"],
            y=table["predicted_speedup"],
            name="predicted (cost model)",
            line={"dash": "dash", "color": "darkorange"},
            xaxis=ideal.xaxis,
            yaxis=ideal.yaxis,
        )
    )
    return table


def _need(calibration: Calibration | None) -> Calibration:
    if calibration is None:
        raise ValueError("calibration=None: measure one first with ddlkit.costmodel.calibrate(cfg)")
    return calibration


def _cluster(cluster: str | None) -> str | None:
    if cluster is not None and cluster not in CLUSTERS:
        raise ValueError(f"cluster={cluster!r} is invalid: valid values are {list(CLUSTERS)}")
    return cluster
