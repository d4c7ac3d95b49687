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
from .legends import legends_per_panel
from .panels import Context, Panel, active_panels, panel_traces
from .rundata import COLORS, RunData

PANEL_PX = 330  # the height of a row of panels
TOP_PX = 86  # above the first row: the figure's title, then the first row's panel titles
BOTTOM_PX = 50


def build_figure(
    runs: list[RunData],
    ctx: Context,
    panels: list[Panel],
    traces: list[list[Any]],
    title: str = "",
    figure: go.Figure | None = None,
) -> go.Figure:
    """Lay the panels out two per row and add their traces; into ``figure``
    (a FigureWidget, say) if given, replacing what it held. The figure's
    width is left to the page (it fills the output); each panel with more than
    one trace gets its own legend, in its top-right corner, so no legend
    competes with a title for the space above the panels."""
    rows = max(1, math.ceil(len(panels) / 2))
    height = PANEL_PX * rows + TOP_PX + BOTTOM_PX
    layout = make_subplots(
        rows=rows,
        cols=2,
        subplot_titles=[p.title for p in panels],
        vertical_spacing=min(0.3, 110 / height),  # room for x-axis titles and the next row's panel titles
        horizontal_spacing=0.09,
    )
    places = [(index // 2 + 1, index % 2 + 1) for index in range(len(panels))]
    legends_per_panel(
        layout, [(row, col, panel_traces_) for (row, col), panel_traces_ in zip(places, traces, strict=True)]
    )
    for (row, col), panel in zip(places, panels, strict=True):
        layout.update_xaxes(title_text=panel.x_title, row=row, col=col)
        layout.update_yaxes(title_text=panel.y_title, row=row, col=col, **panel.y_axis)
    layout.update_layout(
        title={"text": title, "x": 0.01, "xanchor": "left", "y": 1, "yref": "container", "yanchor": "top"},
        title_pad={"t": 10},
        title_font_size=15,
        height=height,
        barmode="overlay",
        uirevision="ddlkit",
        margin={"t": TOP_PX, "b": BOTTOM_PX, "l": 60, "r": 20},
        uniformtext={"minsize": 9, "mode": "hide"},  # text that would be smaller than 9 px is dropped, not squeezed
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
    return " | ".join(
        f"{'' if d.name is None else d.name + ': '}run {d.run.id} · {ranks(d.run.world_size)} ({d.run.status})"
        for d in runs
    )


def ranks(count: int) -> str:
    return f"{count} rank{'s' if count != 1 else ''}"


def figure(
    runs: list[Run] | dict[str, Run] | Run, baseline: Run | None = None, keys: list[str] | None = None
) -> go.Figure:
    """The panels of one or several runs as a static plotly figure. Runs
    given as ``{name: run}`` are called by their names in legends and titles
    (say what differs: ``{"balance=none": a, "balance=dynamic": b}``); else by
    their ids.

    >>> run = Run.from_events([{"type": "step", "rank": 0, "step": 0, "time": 1.0, "loss": 2.0}])
    >>> [annotation.text for annotation in figure(run, keys=["loss_step"]).layout.annotations]
    ['loss vs step (ranks faint, mean bold)']
    >>> [t.name for t in figure({"lr=0.1": run, "lr=0.01": run}, keys=["loss_step"]).data if "mean" in t.name]
    ['lr=0.1 mean loss', 'lr=0.01 mean loss']
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


def load(
    runs: list[Run] | dict[str, Run] | Run, baseline: Run | None = None, read: bool = True
) -> tuple[list[RunData], Context]:
    """RunData for each run (colours in order; named if ``runs`` is a dict),
    and the baseline's; with ``read``, every event is read now (a dashboard
    reads in bounded slices)."""
    if isinstance(runs, Run):
        runs = [runs]
    named = list(runs.items()) if isinstance(runs, dict) else [(None, run) for run in runs]
    data = [RunData(run, COLORS[i % len(COLORS)], read, name=name) for i, (name, run) in enumerate(named)]
    base = next((d for d in data if d.run is baseline), None)
    if baseline is not None and base is None:
        base = RunData(baseline, "gray", read)
    return data, Context(baseline=base)
