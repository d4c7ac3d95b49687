"""The dashboard's panels: a registry, one :class:`Panel` entry per subplot,
with a function that turns the runs' data into traces and a condition saying
when the panel has anything to show. Adding a panel is adding one entry.

>>> from ddlkit.kernel.run import Run
>>> run = Run.from_events([{"type": "step", "rank": 0, "step": s, "time": 1.0 + s, "loss": 1.0, "samples": 8,
...                         "step_time": 0.1, "compute_s": 0.1, "comm_s": 0.0, "wait_s": 0.0} for s in range(3)])
>>> [panel.key for panel in active_panels([RunData(run)])]
['loss_step', 'loss_time', 'throughput', 'breakdown']
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..kernel.run import Run
from . import balance, federated, staleness, timeline
from .rundata import Context, RunData
from .traces import TraceFunction, breakdown, emulates, loss, memory, network, series_name, speedup, throughput


@dataclass
class Panel:
    """One subplot: ``traces`` draws it, ``when`` says if it has data."""

    key: str
    title: str
    traces: TraceFunction
    when: Callable[[list[RunData], Context], bool] = lambda runs, ctx: True
    x_title: str = ""
    y_title: str = ""
    y_axis: dict[str, Any] = field(default_factory=dict)  # more y-axis settings (a Gantt chart's categories)


def per_run(traces: Callable[[Run], list[Any]]) -> TraceFunction:
    """Adapt a helper's ``traces(run) -> list of traces`` to a panel (several
    runs: each trace's name says its run)."""

    def panel(runs: list[RunData], ctx: Context) -> list[Any]:
        out = []
        for data in runs:
            for trace in traces(data.run):
                plain = trace if isinstance(trace, dict) else trace.to_plotly_json()
                out.append({**plain, "name": series_name(data, runs, str(plain.get("name", "")))})
        return out

    return panel


def has_events(kind: str) -> Callable[[list[RunData], Context], bool]:
    """A panel condition: some run has events of this type."""
    return lambda runs, ctx: any(data.event_counts.get(kind) for data in runs)


PANELS: list[Panel] = [
    Panel(
        "loss_step",
        "loss vs step (ranks faint, mean bold)",
        loss("step"),
        x_title="step",
        y_title="loss",
    ),
    Panel("loss_time", "loss vs wall time", loss("time"), x_title="seconds since launch", y_title="loss"),
    Panel("throughput", "throughput (samples/s, all ranks)", throughput, x_title="step", y_title="samples/s"),
    Panel(
        "breakdown",
        "time per step: compute, communication, waiting",
        breakdown,
        x_title="step",
        y_title="seconds",
    ),
    Panel(
        "idle",
        "idle fraction (waiting for the slowest peer): rank 0 solid, 1 dotted, 2 dashed",
        balance.idle_traces,
        when=lambda runs, ctx: any(data.idle for data in runs),
        x_title="step",
        y_title="idle fraction",
    ),
    Panel(
        "shares",
        "share of the global batch (balance): rank 0 solid, 1 dotted, 2 dashed",
        balance.share_traces,
        when=has_events("balance"),
        x_title="step",
        y_title="samples per step",
    ),
    Panel(
        "speedup",
        "speedup vs baseline (dashed: ideal)",
        speedup,
        when=lambda runs, ctx: ctx.baseline is not None,
        x_title="ranks",
        y_title="speedup",
    ),
    Panel(
        "network",
        "comm per step: measured (solid) vs network model (dotted)",
        network,
        when=emulates,
        x_title="step",
        y_title="ms",
    ),
    Panel(
        "memory",
        "memory per rank (MiB)",
        memory,
        when=has_events("memory"),
        x_title="rank",
        y_title="MiB",
    ),
    Panel(
        "pipeline",
        "pipeline timeline, last 2 steps (gaps: bubble)",
        per_run(timeline.traces),
        when=has_events("span"),
        x_title="seconds since launch",
        y_title="stage · rank",
        # every stage's row named, the first stage on top
        y_axis={"type": "category", "categoryorder": "category ascending", "autorange": "reversed", "dtick": 1},
    ),
    Panel(
        "cuts",
        "pipeline stage times: parameter-count cuts (grey) vs auto cuts",
        balance.cut_traces,
        when=has_events("cuts"),
        x_title="stage",
        y_title="ms per micro-batch",
    ),
    Panel(
        "staleness",
        "gradient staleness of applied updates",
        staleness.histogram_panel,
        when=has_events("update"),
        x_title="staleness (updates missed)",
        y_title="updates",
    ),
    Panel(
        "staleness_time",
        "staleness over time, per worker",
        staleness.over_time_panel,
        when=has_events("update"),
        x_title="seconds since launch",
        y_title="staleness",
    ),
    Panel(
        "accuracy",
        "held-out accuracy (▼ live knob applied)",
        federated.accuracy_traces,
        when=has_events("eval"),
        x_title="steps / rounds done",
        y_title="accuracy",
    ),
    Panel(
        "participation",
        "clients per round: whole / partial / dropped",
        federated.participation_traces,
        when=has_events("round"),
        x_title="round",
        y_title="clients",
    ),
    Panel(
        "bytes",
        "MB per round: down (solid) / up (dotted)",
        federated.bytes_traces,
        when=has_events("round"),
        x_title="round",
        y_title="MB",
    ),
    Panel(
        "labels",
        "training samples per client and label",
        federated.label_traces,
        when=has_events("partition"),
        x_title="client",
        y_title="label",
    ),
]


def active_panels(runs: list[RunData], ctx: Context | None = None, keys: list[str] | None = None) -> list[Panel]:
    """The panels that have something to show (only ``keys``, if given)."""
    ctx = ctx or Context()
    return [p for p in PANELS if (keys is None or p.key in keys) and p.when(runs, ctx)]


def panel_traces(runs: list[RunData], ctx: Context, panels: list[Panel]) -> list[list[dict[str, Any]]]:
    """Each panel's traces as plain dicts (ours are built as dicts: plotly's
    validation of trace objects would cost more than the rest of a refresh)."""
    return [[t if isinstance(t, dict) else t.to_plotly_json() for t in panel.traces(runs, ctx)] for panel in panels]
