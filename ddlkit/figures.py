"""The panels of a run, as plotly traces: the live dashboard and the static
report (``run.report(path)``) draw the same panels through the same code.

Two layers:

- :class:`RunData` reads a run's events *incrementally* into numpy arrays (per
  rank, and per step over all ranks). A refresh only parses the events that
  arrived since the last one; the full data stays in the Run.
- :data:`PANELS`, a registry: one :class:`Panel` entry per subplot, with a
  function that turns the runs' data into traces and a condition saying when
  the panel has anything to show. Adding a panel is adding one entry.

Traces are downsampled (:func:`downsample`) so a refresh costs the same at
200 events or 200,000.

>>> import ddlkit
>>> run = ddlkit.launch(ddlkit.RunConfig(strategy="single", world_size=1, steps=5), echo=False).wait(120)
>>> [panel.key for panel in active_panels([RunData(run)])]
['loss_step', 'loss_time', 'throughput', 'breakdown']
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from . import staleness, timeline
from .control import CONTROLS

if TYPE_CHECKING:
    from .run import Run

MAX_POINTS = 1000  # per trace sent to the browser
RECENT_POINTS = 200  # the newest points of a trace are never thinned
MAX_BARS = 100  # bars per run in the time-breakdown panel
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
TIMES = ("compute_s", "comm_s", "wait_s")
MEMORY = ("param_bytes", "grad_bytes", "optimizer_bytes", "peak_activation_bytes")


# ---- incremental data ------------------------------------------------------
class _Column:
    """A float array that grows by doubling: appending is amortised O(new)."""

    def __init__(self) -> None:
        self._data = np.empty(256)
        self.size = 0

    def extend(self, values: list[float]) -> None:
        end = self.size + len(values)
        if end > len(self._data):
            grown = np.empty(max(end, 2 * len(self._data)))
            grown[: self.size] = self._data[: self.size]
            self._data = grown
        self._data[self.size:end] = values
        self.size = end

    @property
    def values(self) -> np.ndarray:
        return self._data[: self.size]


class _PerStep:
    """Arrays indexed by step number, folded over ranks as events arrive."""

    FIELDS = ("count", "loss_sum", "samples_sum", "step_time_max", "time_max", *TIMES)

    def __init__(self) -> None:
        self.arrays = {name: np.zeros(256) for name in self.FIELDS}

    def add(self, steps: np.ndarray, columns: dict[str, np.ndarray]) -> None:
        needed = int(steps.max()) + 1
        if needed > len(self.arrays["count"]):
            size = max(needed, 2 * len(self.arrays["count"]))
            self.arrays = {name: np.concatenate([a, np.zeros(size - len(a))]) for name, a in self.arrays.items()}
        a = self.arrays
        np.add.at(a["count"], steps, 1)
        np.add.at(a["loss_sum"], steps, np.nan_to_num(columns["loss"]))
        np.add.at(a["samples_sum"], steps, np.nan_to_num(columns["samples"]))
        np.maximum.at(a["step_time_max"], steps, np.nan_to_num(columns["step_time"]))
        np.maximum.at(a["time_max"], steps, columns["time"])
        for name in TIMES:
            np.add.at(a[name], steps, np.nan_to_num(columns[name]))


class RunData:
    """What the panels read of one run, kept up to date by :meth:`update`,
    which parses only the events that arrived since it last ran."""

    def __init__(self, run: "Run", color: str = COLORS[0], read: bool = True):
        self.run = run
        self.color = color
        self.cursor = 0  # events read so far
        self.ranks: dict[int, dict[str, _Column]] = {}  # rank -> step, time, loss
        self.per_step = _PerStep()
        self.event_counts: dict[str, int] = {}
        self.markers: list[dict[str, Any]] = []  # control and control_request events
        self.memory: dict[int, dict[str, float]] = {}  # rank -> bytes by kind
        if read:
            self.update()

    @property
    def label(self) -> str:
        return f"{self.run.id} · {self.run.world_size} rank{'s' if self.run.world_size > 1 else ''}"

    def update(self, limit: int | None = None) -> int:
        """Read the new events (at most ``limit``); returns how many were read."""
        events = self.run.events
        end = len(events)  # the collector only appends: everything below `end` is complete
        if limit is not None:
            end = min(end, self.cursor + limit)
        new = events[self.cursor:end]
        self.cursor = end
        if not new:
            return 0
        started = self.run.started
        columns: dict[str, list[float]] = {k: [] for k in ("rank", "step", "time", "loss", "samples", "step_time",
                                                           *TIMES)}
        nan = math.nan
        for event in new:
            kind = event.get("type")
            self.event_counts[kind] = self.event_counts.get(kind, 0) + 1
            if kind == "step":
                columns["rank"].append(event["rank"])
                columns["step"].append(event["step"])
                columns["time"].append(event["time"] - started)
                for name in ("loss", "samples", "step_time", *TIMES):
                    value = event.get(name)
                    columns[name].append(nan if value is None else value)
            elif kind in ("control", "control_request"):
                self.markers.append(event)
            elif kind == "memory":
                self.memory[event["rank"]] = {name: float(event.get(name, 0.0)) for name in MEMORY}
        if columns["step"]:
            self._add_steps({k: np.asarray(v, dtype=float) for k, v in columns.items()})
        return len(new)

    def _add_steps(self, columns: dict[str, np.ndarray]) -> None:
        ranks = columns["rank"].astype(int)
        for rank in np.unique(ranks):
            mine = ranks == rank
            series = self.ranks.setdefault(int(rank), {k: _Column() for k in ("step", "time", "loss")})
            for name, column in series.items():
                column.extend(columns[name][mine])
        self.per_step.add(columns["step"].astype(int), columns)

    # ---- derived series, cheap enough for every refresh ---------------------
    def steps(self, complete: bool = False) -> np.ndarray:
        """Steps some rank logged (``complete``: every rank seen so far logged)."""
        count = self.per_step.arrays["count"]
        return np.flatnonzero(count >= (max(len(self.ranks), 1) if complete else 1))

    def mean(self, name: str, steps: np.ndarray) -> np.ndarray:
        a = self.per_step.arrays
        return a[name][steps] / a["count"][steps]

    def throughput(self) -> tuple[np.ndarray, np.ndarray]:
        """Samples per second over all ranks, per complete step: the samples
        summed over ranks, divided by the slowest rank's step time (the ranks of
        a synchronous step finish together)."""
        steps = self.steps(complete=True)
        a = self.per_step.arrays
        step_time = a["step_time_max"][steps]
        with np.errstate(divide="ignore", invalid="ignore"):
            rate = np.where(step_time > 0, a["samples_sum"][steps] / step_time, np.nan)
        return steps, rate

    def samples_per_s(self) -> float:
        """The run's throughput: from the summary when it finished, else the
        complete steps so far."""
        if self.run.summary.get("samples_per_s"):
            return float(self.run.summary["samples_per_s"])
        steps = self.steps(complete=True)
        a = self.per_step.arrays
        total_time = a["step_time_max"][steps].sum()
        return float(a["samples_sum"][steps].sum() / total_time) if total_time > 0 else math.nan

    def step_at(self, seconds: float) -> float:
        """The step the run was at ``seconds`` after launch."""
        steps = self.steps()
        times = self.per_step.arrays["time_max"][steps]
        return float(np.interp(seconds, times, steps)) if len(steps) else 0.0

    def ended(self) -> bool:
        return self.run.status not in ("starting", "running")

    def caught_up(self) -> bool:
        return self.cursor == len(self.run.events)


def downsample(y: np.ndarray, max_points: int = MAX_POINTS, recent: int = RECENT_POINTS) -> np.ndarray:
    """Indices of the points to draw. The newest ``recent`` points are all kept;
    the older ones are cut into equal buckets, each keeping its minimum and
    maximum (so spikes survive), plus the very first point.

    >>> downsample(np.arange(10.0), max_points=100).tolist() == list(range(10))
    True
    >>> len(downsample(np.random.rand(100_000))) <= 1000
    True
    """
    n = len(y)
    if n <= max_points:
        return np.arange(n)
    old = n - recent
    per_bucket = -(-old // ((max_points - recent - 1) // 2))  # ceil: at most that many buckets
    buckets = -(-old // per_bucket)
    grid = np.full(buckets * per_bucket, np.nan)  # the last bucket padded with NaN
    grid[:old] = y[:old]
    grid = grid.reshape(buckets, per_bucket)
    offsets = np.arange(buckets) * per_bucket
    lows = np.argmin(np.where(np.isnan(grid), np.inf, grid), axis=1) + offsets
    highs = np.argmax(np.where(np.isnan(grid), -np.inf, grid), axis=1) + offsets
    return np.unique(np.concatenate([[0], np.minimum(lows, old - 1), np.minimum(highs, old - 1), np.arange(old, n)]))


# ---- the panels --------------------------------------------------------------
@dataclass
class Context:
    """What a panel may need besides the runs."""

    baseline: RunData | None = None


TraceFunction = Callable[[list[RunData], Context], list[Any]]


@dataclass
class Panel:
    """One subplot: ``traces`` draws it, ``when`` says if it has data."""

    key: str
    title: str
    traces: TraceFunction
    when: Callable[[list[RunData], Context], bool] = lambda runs, ctx: True
    x_title: str = ""
    y_title: str = ""


def per_run(traces: Callable[["Run"], list[Any]]) -> TraceFunction:
    """Adapt a helper's ``traces(run) -> list of traces`` to a panel."""
    return lambda runs, ctx: [trace for data in runs for trace in traces(data.run)]


def has_events(kind: str) -> Callable[[list[RunData], Context], bool]:
    """A panel condition: some run has events of this type."""
    return lambda runs, ctx: any(data.event_counts.get(kind) for data in runs)


def _name(data: RunData, runs: list[RunData], what: str) -> str:
    return what if len(runs) == 1 else f"{data.label} {what}"


def _loss(x_of: str) -> TraceFunction:
    """Loss per rank (faint) and mean over ranks (bold), against step or time,
    with the control markers."""

    def traces(runs: list[RunData], ctx: Context) -> list[Any]:
        out = []
        for data in runs:
            for rank, series in sorted(data.ranks.items()):
                loss = series["loss"].values
                keep = downsample(loss)
                out.append(dict(type="scatter", x=series[x_of].values[keep], y=loss[keep],
                                name=_name(data, runs, f"rank {rank}"), legendgroup=data.run.id, showlegend=False,
                                opacity=0.35, mode="lines", line={"width": 1, "color": data.color}))
            steps = data.steps()
            mean = data.mean("loss_sum", steps)
            keep = downsample(mean)
            x = steps if x_of == "step" else data.per_step.arrays["time_max"][steps]
            out.append(dict(type="scatter", x=x[keep], y=mean[keep], name=_name(data, runs, "mean loss"), mode="lines",
                            legendgroup=data.run.id, line={"width": 3, "color": data.color},
                            showlegend=x_of == "step"))
            out.append(_markers(data, runs, x_of, steps, mean))
        return out

    return traces


def marker_label(event: dict[str, Any]) -> str:
    """'lr=0.01', 'paused', 'resumed', 'stop', 'slowdown {1: 3.0}'."""
    parts = []
    for name, value in event.items():
        if name not in CONTROLS:  # type, rank, time, step, attempt, ...: not a change
            continue
        if name == "paused":
            parts.append("paused" if value else "resumed")
        elif name == "stop":
            parts.append("stop")
        else:
            parts.append(f"{name}={value:g}" if isinstance(value, (int, float)) else f"{name} {value}")
    return ", ".join(parts)


def _markers(data: RunData, runs: list[RunData], x_of: str, steps: np.ndarray, mean: np.ndarray) -> dict:
    """Asked (x) and applied (triangle, labelled) control changes, on the mean
    loss curve: applied ones at the step the ranks switched."""
    x, y, text, hover, symbol = [], [], [], [], []
    times = data.per_step.arrays["time_max"][steps]
    for event in data.markers:
        seconds = event["time"] - data.run.started
        step = event.get("step", data.step_at(seconds))
        applied = event["type"] == "control"
        at = np.interp(step, steps, mean) if len(steps) else 0.0
        x.append(step if x_of == "step" else (np.interp(step, steps, times) if applied and len(steps) else seconds))
        y.append(at)
        label = marker_label(event)
        text.append(label if applied else "")
        hover.append(f"{'applied' if applied else 'asked'}: {label}")
        symbol.append("triangle-down" if applied else "x")
    return dict(type="scatter", x=x, y=y, text=text, hovertext=hover, hoverinfo="text", mode="markers+text",
                textposition="top center", name=_name(data, runs, "controls"), legendgroup=data.run.id,
                showlegend=False, marker={"symbol": symbol, "size": 11, "color": "black"})


def _throughput(runs: list[RunData], ctx: Context) -> list[Any]:
    out = []
    for data in runs:
        steps, rate = data.throughput()
        keep = downsample(rate)
        out.append(dict(type="scatter", x=steps[keep], y=rate[keep], name=_name(data, runs, "samples/s"),
                        mode="lines", legendgroup=data.run.id, showlegend=False, line={"color": data.color}))
    return out


def _breakdown(runs: list[RunData], ctx: Context) -> list[Any]:
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
            out.append(dict(type="bar", x=filled * width, y=height, base=base, width=width / len(runs),
                            offset=index * width / len(runs), name=_name(data, runs, name.removesuffix("_s")),
                            legendgroup=data.run.id, marker={"color": data.color, "opacity": shades[name]},
                            showlegend=False, hovertemplate=f"{name.removesuffix('_s')}: %{{y:.2e}} s<extra></extra>"))
            base = base + height
    return out


def _speedup(runs: list[RunData], ctx: Context) -> list[Any]:
    """Measured samples/s relative to the baseline run, against the ideal
    (linear in the number of ranks)."""
    base = ctx.baseline
    base_rate, base_size = base.samples_per_s(), base.run.world_size
    sizes = sorted({data.run.world_size for data in [base, *runs]})
    out = [dict(type="scatter", x=sizes, y=[size / base_size for size in sizes], name="ideal", mode="lines",
                line={"dash": "dash", "color": "gray"}, showlegend=False)]
    points = [base] + [data for data in runs if data is not base]
    out.append(dict(type="scatter", x=[d.run.world_size for d in points],
                    y=[d.samples_per_s() / base_rate for d in points], text=[d.label for d in points],
                    mode="markers+lines", name="measured speedup", showlegend=False,
                    marker={"size": 10, "color": [d.color for d in points]}, line={"color": "black"}))
    return out


def _memory(runs: list[RunData], ctx: Context) -> list[Any]:
    """Bytes each rank holds, stacked by kind (from `memory` events)."""
    out = []
    for data in runs:
        ranks = sorted(data.memory)
        x = [_name(data, runs, f"rank {rank}") for rank in ranks]
        base = np.zeros(len(ranks))
        for shade, name in zip((1.0, 0.7, 0.45, 0.25), MEMORY):
            height = np.array([data.memory[rank][name] for rank in ranks]) / 2**20
            out.append(dict(type="bar", x=x, y=height, base=base, name=name.removesuffix("_bytes"), showlegend=False,
                            legendgroup=data.run.id, marker={"color": data.color, "opacity": shade},
                            hovertemplate=f"{name.removesuffix('_bytes')}: %{{y:.2f}} MiB<extra></extra>"))
            base = base + height
    return out


PANELS: list[Panel] = [
    Panel("loss_step", "loss vs step (ranks faint, mean bold, ▼ control applied)", _loss("step"),
          x_title="step", y_title="loss"),
    Panel("loss_time", "loss vs wall time", _loss("time"), x_title="seconds since launch", y_title="loss"),
    Panel("throughput", "throughput (samples/s, all ranks)", _throughput, x_title="step", y_title="samples/s"),
    Panel("breakdown", "time per step: compute / comm / wait (dark to light)", _breakdown, x_title="step",
          y_title="seconds"),
    Panel("speedup", "speedup vs baseline (dashed: ideal)", _speedup, when=lambda runs, ctx: ctx.baseline is not None,
          x_title="ranks", y_title="speedup"),
    Panel("memory", "memory per rank (MiB: params, grads, optimizer, activations)", _memory,
          when=has_events("memory"), y_title="MiB"),
    Panel("pipeline", "pipeline timeline, last 2 steps (gaps: bubble)", per_run(timeline.traces),
          when=has_events("span"), x_title="seconds since launch", y_title="stage · rank"),
    Panel("staleness", "gradient staleness of applied updates", per_run(staleness.histogram_traces),
          when=has_events("update"), x_title="staleness (updates missed)", y_title="updates"),
    Panel("staleness_time", "staleness over time, per worker", per_run(staleness.over_time_traces),
          when=has_events("update"), x_title="seconds since launch", y_title="staleness"),
]


def active_panels(runs: list[RunData], ctx: Context | None = None, keys: list[str] | None = None) -> list[Panel]:
    """The panels that have something to show (only ``keys``, if given)."""
    ctx = ctx or Context()
    return [p for p in PANELS if (keys is None or p.key in keys) and p.when(runs, ctx)]


def panel_traces(runs: list[RunData], ctx: Context, panels: list[Panel]) -> list[list[dict[str, Any]]]:
    """Each panel's traces as plain dicts (ours are built as dicts: plotly's
    validation of trace objects would cost more than the rest of a refresh)."""
    return [[t if isinstance(t, dict) else t.to_plotly_json() for t in panel.traces(runs, ctx)] for panel in panels]


def build_figure(runs: list[RunData], ctx: Context, panels: list[Panel], traces: list[list[Any]],
                 title: str = "", figure: go.Figure | None = None) -> go.Figure:
    """Lay the panels out two per row and add their traces; into ``figure``
    (a FigureWidget, say) if given, replacing what it held."""
    rows = max(1, math.ceil(len(panels) / 2))
    layout = make_subplots(rows=rows, cols=2, subplot_titles=[p.title for p in panels],
                           vertical_spacing=min(0.12, 0.35 / rows), horizontal_spacing=0.1)
    for index, (panel, panel_traces_) in enumerate(zip(panels, traces)):
        row, col = index // 2 + 1, index % 2 + 1
        for trace in panel_traces_:
            layout.add_trace(trace, row=row, col=col)
        layout.update_xaxes(title_text=panel.x_title, row=row, col=col)
        layout.update_yaxes(title_text=panel.y_title, row=row, col=col)
    layout.update_layout(title=title, height=330 * rows + 80, barmode="overlay", uirevision="ddlkit",
                         margin={"t": 90, "b": 40, "l": 60, "r": 20}, legend={"orientation": "h", "y": 1.06})
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


def figure(runs: "list[Run] | Run", baseline: "Run | None" = None, keys: list[str] | None = None) -> go.Figure:
    """The panels of one or several runs as a static plotly figure.

    >>> import ddlkit
    >>> run = ddlkit.launch(ddlkit.RunConfig(strategy="single", world_size=1, steps=5), echo=False).wait(120)
    >>> len(figure(run).data) > 0
    True
    """
    data, ctx = load(runs, baseline)
    panels = active_panels(data, ctx, keys)
    return build_figure(data, ctx, panels, panel_traces(data, ctx, panels), title_of(data))


def load(runs: "list[Run] | Run", baseline: "Run | None" = None, read: bool = True) -> tuple[list[RunData], Context]:
    """RunData for each run (colours in order), and the baseline's; with
    ``read``, every event is read now (a dashboard reads in bounded slices)."""
    from .run import Run

    runs = [runs] if isinstance(runs, Run) else list(runs)
    data = [RunData(run, COLORS[i % len(COLORS)], read) for i, run in enumerate(runs)]
    base = next((d for d in data if d.run is baseline), None)
    if baseline is not None and base is None:
        base = RunData(baseline, "gray", read)
    return data, Context(baseline=base)


def write_report(run: "Run", path: str | Path) -> Path:
    """A standalone HTML page (plotly's JavaScript embedded: it opens offline)."""
    path = Path(path)
    figure(run).write_html(path, include_plotlyjs=True, full_html=True)
    return path
