"""The panels of one or several runs as one plotly figure: the live
Dashboard and the static report (``ddlkit.report(run, path)``) draw the same
panels (``ddlkit.view.panels``) from the same data (``ddlkit.view.rundata``).

>>> from ddlkit.kernel.run import Run
>>> run = Run.from_events([{"type": "step", "rank": 0, "step": s, "time": 1.0 + s, "loss": 1.0} for s in range(3)])
>>> [trace.name for trace in figure(run).data][:2]
['rank 0', 'mean loss']
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..files import write_atomic
from ..kernel.run import Run
from .panels import Context, Panel, active_panels, panel_traces
from .rundata import COLORS, RunData


def build_figure(
    runs: list[RunData],
    ctx: Context,
    panels: list[Panel],
    traces: list[list[Any]],
    title: str = "",
    figure: go.Figure | None = None,
) -> go.Figure:
    """Lay the panels out two per row and add their traces; into ``figure``
    (a FigureWidget, say) if given, replacing what it held."""
    rows = max(1, math.ceil(len(panels) / 2))
    layout = make_subplots(
        rows=rows,
        cols=2,
        subplot_titles=[p.title for p in panels],
        vertical_spacing=min(0.12, 0.35 / rows),
        horizontal_spacing=0.1,
    )
    for index, (panel, panel_traces_) in enumerate(zip(panels, traces, strict=True)):
        row, col = index // 2 + 1, index % 2 + 1
        for trace in panel_traces_:
            layout.add_trace(trace, row=row, col=col)
        layout.update_xaxes(title_text=panel.x_title, row=row, col=col)
        layout.update_yaxes(title_text=panel.y_title, row=row, col=col)
    layout.update_layout(
        title=title,
        height=330 * rows + 80,
        barmode="overlay",
        uirevision="ddlkit",
        margin={"t": 90, "b": 40, "l": 60, "r": 20},
        legend={"orientation": "h", "y": 1.06},
    )
    layout.update_annotations(font_size=12)
    if figure is None:
        return layout
    with figure.batch_update():
        figure.data = ()
        figure.layout = layout.layout
        figure.add_traces(layout.data)
    return figure


def title_of(runs: list[RunData]) -> str:
    return " | ".join(f"run {d.label} ({d.run.status})" for d in runs)


def figure(runs: list[Run] | Run, baseline: Run | None = None, keys: list[str] | None = None) -> go.Figure:
    """The panels of one or several runs as a static plotly figure.

    >>> run = Run.from_events([{"type": "step", "rank": 0, "step": 0, "time": 1.0, "loss": 2.0}])
    >>> [annotation.text for annotation in figure(run, keys=["loss_step"]).layout.annotations]
    ['loss vs step (ranks faint, mean bold, ▼ control applied)']
    """
    data, ctx = load(runs, baseline)
    panels = active_panels(data, ctx, keys)
    return build_figure(data, ctx, panels, panel_traces(data, ctx, panels), title_of(data))


def report(run: Run, path: str | Path) -> Path:
    """The run's panels as a standalone HTML page (plotly's JavaScript embedded:
    it opens offline), private like the run's files (``ddlkit.files``)."""
    path = Path(path)
    page = figure(run).to_html(include_plotlyjs=True, full_html=True)
    write_atomic(path, lambda f: f.write(page.encode()))
    return path


def load(runs: list[Run] | Run, baseline: Run | None = None, read: bool = True) -> tuple[list[RunData], Context]:
    """RunData for each run (colours in order), and the baseline's; with
    ``read``, every event is read now (a dashboard reads in bounded slices)."""
    runs = [runs] if isinstance(runs, Run) else list(runs)
    data = [RunData(run, COLORS[i % len(COLORS)], read) for i, run in enumerate(runs)]
    base = next((d for d in data if d.run is baseline), None)
    if baseline is not None and base is None:
        base = RunData(baseline, "gray", read)
    return data, Context(baseline=base)
