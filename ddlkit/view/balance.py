"""Load balance made visible: how much of each rank's time is idle (waiting
for the slowest peer at the all-reduce), the shares a balancer gave the ranks,
and the pipeline stage times before and after ``cut_points="auto"``.

Idle time is measured on sampled steps (``time_every``; rows with ``idle_s``).

>>> from ddlkit.kernel.run import Run
>>> rows = [{"type": "step", "rank": r, "step": s, "time": 1.0 + s, "samples": 8 if r else 24,
...          "step_time": 0.1, "idle_s": 0.04 if r == 0 else 0.0, "transfer_s": 0.01} for s in range(4) for r in (0, 1)]
>>> idle_table(Run.from_events(rows))["idle_fraction"].round(3).to_dict()
{0: 0.4, 1: 0.0}
>>> throughput(Run.from_events(rows))  # 32 samples a step, 0.1 s a step
320.0
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from ..kernel.run import Run
from .rundata import Context, RunData, downsample
from .traces import series_name

DASHES = ("solid", "dot", "dash", "dashdot", "longdash", "longdashdot")  # rank 0, 1, ...: the run keeps its colour


def idle_table(run: Run, from_step: int = 0) -> pd.DataFrame:
    """Per rank, over the sampled steps from ``from_step`` on: how many, the
    seconds idle and transferring, and their fractions of those steps' time."""
    rows = run.metrics
    if "idle_s" not in rows:
        raise ValueError(
            f"run {run.id} has no idle time: it is measured on sampled steps (time_every) "
            "by a lockstep strategy with two or more ranks"
        )
    rows = rows[(rows["step"] >= from_step) & rows["idle_s"].notna()]
    table = rows.groupby("rank").agg(
        sampled_steps=("step", "size"),
        idle_s=("idle_s", "sum"),
        transfer_s=("transfer_s", "sum"),
        step_time=("step_time", "sum"),
    )
    table["idle_fraction"] = table["idle_s"] / table["step_time"]
    table["transfer_fraction"] = table["transfer_s"] / table["step_time"]
    return table


def throughput(run: Run, from_step: int = 0) -> float:
    """Samples per second of the whole run from ``from_step`` on: every rank's
    samples over the steps' time (a synchronous step lasts as long as its slowest rank)."""
    rows = run.metrics
    rows = rows[rows["step"] >= from_step].groupby("step").agg(samples=("samples", "sum"), time=("step_time", "max"))
    return float(rows["samples"].sum() / rows["time"].sum())


def shares(run: Run) -> pd.DataFrame:
    """The shares in force from each re-share on: one row per step of a
    ``balance`` event, one column per rank (samples per step)."""
    seen = {e["step"]: e["shares"] for e in run.events if e["type"] == "balance"}
    return pd.DataFrame.from_dict(seen, orient="index").rename_axis("step").rename_axis("rank", axis=1)


def idle_traces(runs: list[RunData], ctx: Context) -> list[Any]:
    """Idle fraction per rank over the sampled steps (one line per rank)."""
    out = []
    for data in runs:
        for rank, series in sorted(data.idle.items()):
            steps, fraction = series["step"].values, series["fraction"].values
            keep = downsample(fraction)
            out.append(
                dict(
                    type="scatter",
                    x=steps[keep],
                    y=fraction[keep],
                    name=series_name(data, runs, f"rank {rank}"),
                    mode="lines+markers",
                    marker={"size": 4},
                    line={"color": data.color, "dash": DASHES[rank % len(DASHES)]},
                    legendgroup=data.run.id,
                    showlegend=False,
                    hovertemplate=f"rank {rank}: %{{y:.0%}} idle at step %{{x}}<extra></extra>",
                )
            )
    return out


def share_traces(runs: list[RunData], ctx: Context) -> list[Any]:
    """Each rank's share of the global batch, a step line from each re-share on."""
    out = []
    for data in runs:
        decided = {e["step"]: e["shares"] for e in data.kept["balance"]}
        if not decided:
            continue
        steps = sorted(decided)
        last = max(steps[-1], int(data.steps()[-1]) if len(data.steps()) else 0)
        for rank in range(len(decided[steps[0]])):
            out.append(
                dict(
                    type="scatter",
                    x=[*steps, last],
                    y=[*(decided[s][rank] for s in steps), decided[steps[-1]][rank]],
                    name=series_name(data, runs, f"rank {rank} share"),
                    mode="lines",
                    line={"color": data.color, "shape": "hv", "dash": DASHES[rank % len(DASHES)]},
                    legendgroup=data.run.id,
                    showlegend=False,
                )
            )
    return out


def cut_traces(runs: list[RunData], ctx: Context) -> list[Any]:
    """Bars of each pipeline stage's profiled time: parameter-count cuts
    (before, grey) beside the auto cuts (after, the run's colour)."""
    out = []
    for data in runs:
        for report in data.kept["cuts"][-1:]:
            for key, label, color in (("param_stage_s", "by parameters", "#aaaaaa"), ("stage_s", "auto", data.color)):
                cuts = report["param_cuts" if key == "param_stage_s" else "cuts"]
                out.append(
                    dict(
                        type="bar",
                        x=[f"stage {k}" for k in range(len(report[key]))],
                        y=list(np.asarray(report[key]) * 1000),
                        name=series_name(data, runs, f"{label} {cuts}"),
                        marker={"color": color},
                        legendgroup=data.run.id,
                        hovertemplate=f"{label}: %{{y:.2f}} ms<extra></extra>",
                    )
                )
    return out


def cuts_figure(run: Run) -> Any:
    """A figure of the stage times before and after ``cut_points="auto"``."""
    import plotly.graph_objects as go  # deferred: the view is imported lazily

    fig = go.Figure(cut_traces([RunData(run)], Context()))
    fig.update_layout(
        barmode="group",
        title="pipeline stage times (profiled): parameter-count cuts vs auto cuts",
        yaxis_title="ms (forward + backward)",
        height=360,
    )
    return fig
