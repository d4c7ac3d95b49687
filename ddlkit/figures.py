"""Figures of a run's metrics, as plotly figures: the static report and the
live dashboard draw the same panels from the same table.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

if TYPE_CHECKING:
    from .run import Run


def throughput(metrics: pd.DataFrame) -> pd.DataFrame:
    """Samples per second over all ranks, per step: each step's samples summed
    across ranks, divided by the slowest rank's step time (ranks of a
    synchronous step finish together)."""
    if metrics.empty or not {"samples", "step_time"} <= set(metrics):
        return pd.DataFrame(columns=["step", "samples_per_s"])
    per_step = metrics.groupby("step").agg(samples=("samples", "sum"), step_time=("step_time", "max"))
    per_step["samples_per_s"] = per_step["samples"] / per_step["step_time"]
    return per_step.reset_index()[["step", "samples_per_s"]]


def report_figure(run: "Run") -> go.Figure:
    """Loss per rank (faint) and mean (bold) against step, and throughput."""
    metrics = run.metrics
    fig = make_subplots(rows=1, cols=2, subplot_titles=("loss", "throughput (samples/s, all ranks)"))
    if not metrics.empty and "loss" in metrics:
        for rank, rows in metrics.groupby("rank"):
            fig.add_trace(go.Scatter(x=rows["step"], y=rows["loss"], name=f"rank {rank}", opacity=0.35,
                                     line={"width": 1}), row=1, col=1)
        mean = metrics.groupby("step")["loss"].mean()
        fig.add_trace(go.Scatter(x=mean.index, y=mean.values, name="mean loss", line={"width": 3}), row=1, col=1)
    rate = throughput(metrics)
    fig.add_trace(go.Scatter(x=rate["step"], y=rate["samples_per_s"], name="samples/s"), row=1, col=2)
    fig.update_xaxes(title_text="step")
    fig.update_layout(title=f"run {run.id} ({run.status}, {run.world_size} ranks)", height=420)
    return fig


def write_report(run: "Run", path: str | Path) -> Path:
    """A standalone HTML page (plotly's JavaScript embedded: it opens offline)."""
    path = Path(path)
    report_figure(run).write_html(path, include_plotlyjs=True, full_html=True)
    return path
