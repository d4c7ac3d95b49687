"""The traces of the built-in panels: loss (per rank and mean, with the
control markers), throughput, the time breakdown, speedup and memory, as plain
dicts (plotly's validation of trace objects would cost more than the rest of a
refresh).

>>> marker_label({"type": "control", "step": 3, "lr": 0.01, "paused": True, "knobs": {"fraction": 0.2}})
'lr=0.01, paused, fraction=0.2'
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from ..controls import CONTROLS
from .rundata import MEMORY, TIMES, Context, RunData, downsample, tint

MAX_BARS = 100  # bars per run in the time-breakdown panel
TraceFunction = Callable[[list[RunData], Context], list[Any]]


def series_name(data: RunData, runs: list[RunData], what: str) -> str:
    return what if len(runs) == 1 else f"{data.label} {what}"


def loss(x_of: str) -> TraceFunction:
    """Loss per rank (faint) and mean over ranks (bold), against step or time,
    with the control markers. The legend names the mean and, as one entry, the
    ranks (clicking it hides or shows them all)."""

    def traces(runs: list[RunData], ctx: Context) -> list[Any]:
        out = []
        for data in runs:
            ranks = f"{data.run.id}-ranks"
            faint = {"width": 1, "color": data.color}
            if len(data.ranks) > 1:  # a legend entry for the faint lines, without data of its own
                out.append(
                    dict(
                        type="scatter",
                        x=[None],  # plotly lists no trace without a point in its legend
                        y=[None],
                        name=series_name(data, runs, "each rank"),
                        legendgroup=ranks,
                        opacity=0.35,
                        mode="lines",
                        line=faint,
                    )
                )
            for rank, series in sorted(data.ranks.items()):
                loss = series["loss"].values
                keep = downsample(loss)
                out.append(
                    dict(
                        type="scatter",
                        x=series[x_of].values[keep],
                        y=loss[keep],
                        name=series_name(data, runs, f"rank {rank}"),
                        legendgroup=ranks,
                        showlegend=False,
                        opacity=0.35,
                        mode="lines",
                        line=faint,
                    )
                )
            steps = data.steps()
            mean = data.mean("loss_sum", steps)
            keep = downsample(mean)
            x = steps if x_of == "step" else data.per_step.arrays["time_max"][steps]
            out.append(
                dict(
                    type="scatter",
                    x=x[keep],
                    y=mean[keep],
                    name=series_name(data, runs, "mean loss"),
                    mode="lines",
                    legendgroup=data.run.id,
                    line={"width": 3, "color": data.color},
                )
            )
            out.extend(markers(data, runs, x_of, steps, mean))
        return out

    return traces


def marker_label(event: dict[str, Any]) -> str:
    """'lr=0.01', 'paused', 'resumed', 'stop', 'relaunch' (a stop that saves), 'slowdown {1: 3.0}', and a
    strategy's live knobs ('fraction=0.2')."""
    parts = []
    changes = {**{k: v for k, v in event.items() if k in CONTROLS}, **event.get("knobs", {})}  # not type, step, ...
    if changes.get("stop") and changes.pop("save", False):
        changes["stop"] = "relaunch"  # a stop that saves the step: the run goes on in a new layout
    for name, value in changes.items():
        if name == "paused":
            parts.append("paused" if value else "resumed")
        elif name == "stop":
            parts.append("relaunch" if value == "relaunch" else "stop")
        else:
            parts.append(f"{name}={value:g}" if isinstance(value, (int, float)) else f"{name} {value}")
    return ", ".join(parts)


def markers(data: RunData, runs: list[RunData], x_of: str, steps: np.ndarray, mean: np.ndarray) -> list[dict]:
    """Control changes on the mean loss curve, two traces: asked (a small grey
    x, when ``run.control`` was called) and applied (a large black triangle,
    labelled, at the step the ranks switched). The applied one is drawn last,
    on top: it is often only a few steps after the asked one, and a long run's
    axis puts them on the same pixels (the triangle used to vanish under the x)."""
    asked: dict[str, list[Any]] = {"x": [], "y": [], "hovertext": []}
    applied: dict[str, list[Any]] = {"x": [], "y": [], "hovertext": [], "text": []}
    for event in data.markers:
        seconds = event["time"] - data.run.started
        step = event.get("step", data.step_at(seconds))
        is_applied = event["type"] == "control"
        shown = applied if is_applied else asked
        shown["x"].append(step if x_of == "step" else seconds)  # against time: when it was asked, or applied
        shown["y"].append(np.interp(step, steps, mean) if len(steps) else 0.0)
        label = marker_label(event)
        shown["hovertext"].append(f"{'applied' if is_applied else 'asked'}: {label}")
        if is_applied:
            applied["text"].append(label)
    # Every other label one line higher (an empty line under it): a relaunch a few steps after an lr
    # change wrote "lr=0.00?elaunch" when both sat on the same line.
    applied["text"] = [label + ("<br>\u00a0" if i % 2 else "") for i, label in enumerate(applied["text"])]
    common = {"type": "scatter", "hoverinfo": "text", "legendgroup": f"{data.run.id}-controls"}
    return [
        {
            **common,
            **asked,
            "mode": "markers",
            "name": series_name(data, runs, "control asked"),
            "marker": {"symbol": "x-thin", "size": 9, "color": "#777", "line": {"width": 2, "color": "#777"}},
        },
        {
            **common,
            **applied,
            "mode": "markers+text",
            "textposition": "top center",
            "name": series_name(data, runs, "control applied"),
            "marker": {"symbol": "triangle-down", "size": 14, "color": "black", "line": {"width": 1, "color": "white"}},
        },
    ]


def throughput(runs: list[RunData], ctx: Context) -> list[Any]:
    out = []
    for data in runs:
        steps, rate = data.throughput()
        keep = downsample(rate)
        out.append(
            dict(
                type="scatter",
                x=steps[keep],
                y=rate[keep],
                name=series_name(data, runs, "samples/s"),
                mode="lines",
                legendgroup=data.run.id,
                line={"color": data.color},
            )
        )
    return out


def breakdown(runs: list[RunData], ctx: Context) -> list[Any]:
    """Mean compute / communication / waiting seconds per step over ranks,
    averaged into at most MAX_BARS bars per run; runs side by side."""
    out = []
    shades = {"compute_s": 1.0, "comm_s": 0.6, "wait_s": 0.25}
    for index, data in enumerate(runs):
        steps = data.steps(complete=True)
        if not len(steps):
            continue
        width = max(1, math.ceil((steps[-1] + 1) / MAX_BARS))
        bucket = steps // width
        counts = np.bincount(bucket)
        filled = np.flatnonzero(counts)
        base = np.zeros(len(filled))
        for name in TIMES:
            per_step = data.mean(name, steps)
            height = np.bincount(bucket, weights=per_step)[filled] / counts[filled]
            out.append(
                dict(
                    type="bar",
                    x=filled * width,
                    y=height,
                    base=base,
                    width=width / len(runs),
                    offset=index * width / len(runs),
                    name=series_name(data, runs, name.removesuffix("_s")),
                    legendgroup=data.run.id,
                    marker={"color": tint(data.color, shades[name])},
                    hovertemplate=f"{name.removesuffix('_s')}: %{{y:.2e}} s<extra></extra>",
                )
            )
            base = base + height
    return out


def speedup(runs: list[RunData], ctx: Context) -> list[Any]:
    """Measured samples/s relative to the baseline run, against the ideal
    (linear in the number of ranks)."""
    base = ctx.baseline
    assert base is not None  # the panel shows only with a baseline
    base_rate, base_size = base.samples_per_s(), base.run.world_size
    sizes = sorted({data.run.world_size for data in [base, *runs]})
    out = [
        dict(
            type="scatter",
            x=sizes,
            y=[size / base_size for size in sizes],
            name="ideal",
            mode="lines",
            line={"dash": "dash", "color": "gray"},
        )
    ]
    points = [base] + [data for data in runs if data is not base]
    out.append(
        dict(
            type="scatter",
            x=[d.run.world_size for d in points],
            y=[d.samples_per_s() / base_rate for d in points],
            text=[d.label for d in points],
            mode="markers+lines",
            name="measured speedup",
            marker={"size": 10, "color": [d.color for d in points]},
            line={"color": "black"},
        )
    )
    return out


def network(runs: list[RunData], ctx: Context) -> list[Any]:
    """Per step, the communication time measured (solid) beside what the
    emulated network's alpha-beta model added to it (dotted), ranks averaged."""
    out = []
    for data in runs:
        steps = data.steps(complete=True)
        for name, dash, label in (("comm_s", "solid", "comm measured"), ("network_s", "dot", "network model")):
            out.append(
                dict(
                    type="scatter",
                    x=steps,
                    y=data.mean(name, steps) * 1e3,
                    mode="lines",
                    name=series_name(data, runs, label),
                    legendgroup=data.run.id,
                    line={"color": data.color, "dash": dash},
                    showlegend=False,
                )
            )
    return out


def emulates(runs: list[RunData], ctx: Context) -> bool:
    """Some run's steps went over an emulated network."""
    return any(data.per_step.arrays["network_s"].any() for data in runs)


def memory(runs: list[RunData], ctx: Context) -> list[Any]:
    """Bytes each rank holds, stacked by kind (from `memory` events)."""
    out = []
    for data in runs:
        ranks = sorted(data.memory)
        x = [f"rank {rank}" if len(runs) == 1 else f"{data.label}<br>rank {rank}" for rank in ranks]
        base = np.zeros(len(ranks))
        for shade, name in zip((1.0, 0.7, 0.45, 0.25), MEMORY, strict=True):
            height = np.array([data.memory[rank][name] for rank in ranks]) / 2**20
            out.append(
                dict(
                    type="bar",
                    x=x,
                    y=height,
                    base=base,
                    name=series_name(data, runs, name.removesuffix("_bytes")),
                    legendgroup=data.run.id,
                    marker={"color": tint(data.color, shade)},
                    hovertemplate=f"{name.removesuffix('_bytes')}: %{{y:.2f}} MiB<extra></extra>",
                )
            )
            base = base + height
    return out
