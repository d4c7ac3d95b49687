"""Reading asynchronous runs: staleness, per-rank pace, loss against time.

Pure functions of a run's events and metrics (``update`` events of parameter
servers and hogwild ranks, ``step`` rows of workers: see docs/events.md).
``histogram_panel`` and ``over_time_panel`` are the dashboard's two
staleness panels (several runs compared side by side); ``figure(run)`` lays
them out on their own.

>>> update = {"type": "update", "rank": 0, "time": 1.5, "worker": 1, "step": 4, "read_version": 3,
...           "applied_version": 5, "staleness": 2, "dropped": False}
>>> staleness_table(Run.from_events([update], started=1.0))[["time", "staleness"]].values.tolist()
[[0.5, 2.0]]
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..kernel.run import Run
from .legends import legends_per_panel
from .rundata import COLORS, Context, RunData, tint
from .traces import series_name

DASHES = ["solid", "dot", "dash", "dashdot"]
COLUMNS = ["time", "server", "worker", "step", "read_version", "applied_version", "staleness", "dropped"]


def staleness_table(run: Run) -> pd.DataFrame:
    """One row per update event; ``time`` in seconds since launch, ``server``
    the rank that applied it."""
    rows = [
        {**{k: e.get(k) for k in COLUMNS}, "time": e["time"] - run.started, "server": e["rank"]}
        for e in run.events
        if e["type"] == "update"
    ]
    return pd.DataFrame(rows, columns=COLUMNS)


def histogram(table: pd.DataFrame) -> pd.DataFrame:
    """How many updates had each staleness: columns staleness, applied, dropped.

    >>> t = pd.DataFrame({"staleness": [0, 2, 2, 3], "dropped": [False, False, True, True]})
    >>> histogram(t).values.tolist()
    [[0, 1, 0], [1, 0, 0], [2, 1, 1], [3, 0, 1]]
    """
    if table.empty:
        return pd.DataFrame(columns=["staleness", "applied", "dropped"])
    counts = pd.crosstab(table["staleness"], table["dropped"].astype(bool))
    counts = counts.reindex(range(int(table["staleness"].max()) + 1), fill_value=0)
    return pd.DataFrame(
        {"staleness": counts.index.astype(int), "applied": counts.get(False, 0), "dropped": counts.get(True, 0)}
    ).reset_index(drop=True)


def per_worker(table: pd.DataFrame) -> dict[int, pd.DataFrame]:
    """Each worker's updates in the order they were applied (time, step, staleness)."""
    return {
        int(w): rows.sort_values("time")[["time", "step", "staleness", "dropped"]].reset_index(drop=True)
        for w, rows in table.groupby("worker")
    }


def rank_activity(run: Run) -> pd.DataFrame:
    """Per rank: steps, step rate, and the time it spent idle: a worker waiting
    for its servers (``wait_s``), a server waiting for gradients (``idle_s``)."""
    metrics, rows = run.metrics, []
    for rank, steps in metrics.groupby("rank") if not metrics.empty else []:
        span = steps["time"].max() - steps["time"].min()
        rows.append(
            {
                "rank": int(rank),
                "role": "worker",
                "steps": len(steps),
                "steps_per_s": (len(steps) - 1) / span if span > 0 else float("nan"),
                "idle_s": steps["wait_s"].sum(),
            }
        )
    for rank in sorted({e["rank"] for e in run.events if e["type"] == "update" and "idle_s" in e}):
        idle = sum(e["idle_s"] for e in run.events if e["type"] == "update" and e["rank"] == rank)
        rows.append(
            {"rank": rank, "role": "server", "steps": float("nan"), "steps_per_s": float("nan"), "idle_s": idle}
        )
    return pd.DataFrame(rows, columns=["rank", "role", "steps", "steps_per_s", "idle_s"])


def histogram_panel(runs: list[RunData], ctx: Context) -> list[dict[str, Any]]:
    """Dashboard panel: how many applied (and, stacked on them, dropped)
    updates had each staleness; several runs side by side, each in its colour."""
    out: list[dict[str, Any]] = []
    width = 0.8 / max(len(runs), 1)
    for index, data in enumerate(runs):
        counts = histogram(staleness_table(data.run))
        bars = {"type": "bar", "x": counts["staleness"].to_numpy(), "width": width, "offset": -0.4 + index * width}
        applied = counts["applied"].to_numpy()
        out.append(
            {
                **bars,
                "y": applied,
                "name": series_name(data, runs, "applied updates"),
                "legendgroup": data.run.id,
                "marker": {"color": data.color},
            }
        )
        if not counts.empty and counts["dropped"].sum():
            out.append(
                {
                    **bars,
                    "y": counts["dropped"].to_numpy(),
                    "base": applied,
                    "name": series_name(data, runs, "dropped"),
                    "legendgroup": data.run.id,
                    "marker": {"color": tint(data.color, 0.35)},
                }
            )
    return out


def over_time_panel(runs: list[RunData], ctx: Context) -> list[dict[str, Any]]:
    """Dashboard panel: the staleness of each worker's applied updates over
    time (several runs: each in its colour, workers by dash)."""
    out = []
    for data in runs:
        for dash, (worker, rows) in zip(DASHES * 64, per_worker(staleness_table(data.run)).items(), strict=False):
            line = {"shape": "hv", **({"color": data.color, "dash": dash} if len(runs) > 1 else {})}
            out.append(
                {
                    "type": "scatter",
                    "x": rows["time"].to_numpy(),
                    "y": rows["staleness"].to_numpy(),
                    "mode": "lines+markers",
                    "name": series_name(data, runs, f"worker {worker}"),
                    "legendgroup": data.run.id,
                    "line": line,
                }
            )
    return out


def figure(runs: Run | list[Run] | dict[str, Run]) -> go.Figure:
    """Both staleness panels side by side, as the dashboard draws them:
    histogram left, over time right; several runs (a dict names them) compared.

    >>> from ddlkit.kernel.run import Run
    >>> update = {"type": "update", "rank": 0, "time": 1.5, "worker": 1, "step": 4, "read_version": 3,
    ...           "applied_version": 5, "staleness": 2, "dropped": False}
    >>> [t.name for t in figure({"bsp": Run.from_events([update]), "async": Run.from_events([update])}).data][:2]
    ['bsp applied updates', 'async applied updates']
    """
    named: list[tuple[str | None, Run]] = (
        list(runs.items())
        if isinstance(runs, dict)
        else [(None, run) for run in ([runs] if isinstance(runs, Run) else runs)]
    )
    data = [RunData(run, COLORS[i % len(COLORS)], name=name) for i, (name, run) in enumerate(named)]
    fig = make_subplots(rows=1, cols=2, subplot_titles=("staleness of applied updates", "staleness over time"))
    ctx = Context()
    legends_per_panel(fig, [(1, 1, histogram_panel(data, ctx)), (1, 2, over_time_panel(data, ctx))])
    fig.update_xaxes(title_text="staleness (updates missed)", row=1, col=1)
    fig.update_yaxes(title_text="updates", row=1, col=1)
    fig.update_xaxes(title_text="seconds since launch", row=1, col=2)
    fig.update_yaxes(title_text="staleness (updates missed)", row=1, col=2)
    fig.update_layout(barmode="overlay", height=400, margin={"t": 60})
    return fig


def loss_vs_time(runs: dict[str, Run]) -> list[go.Scatter]:
    """Mean worker loss against wall time, one trace per labelled run (e.g.
    bsp, async, ssp), to overlay: who gets how low how soon."""
    out = []
    for label, run in runs.items():
        rows = run.metrics.sort_values("time")
        # a point per (worker, step) row in time order, smoothed over the last few
        smooth = rows["loss"].rolling(max(1, run.world_size), min_periods=1).mean()
        out.append(go.Scatter(x=rows["time"], y=smooth, mode="lines", name=label))
    return out


def throughput_while_all_work(run: Run) -> float:
    """Samples per second summed over workers, from the start until the first
    worker has done all its steps (after that a straggler finishes alone, and
    any mode is as slow as it). Needs a row per step (``log_every=1``)."""
    rows = run.metrics
    start = (rows["time"] - rows["step_time"]).min()
    first_done = rows.groupby("rank")["time"].max().min()
    return float(rows.loc[rows["time"] <= first_done, "samples"].sum() / (first_done - start))
