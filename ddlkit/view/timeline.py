"""The pipeline timeline: spans as a table, the measured bubble beside the
theory, a Gantt chart, and memory per rank. Pure functions of a Run (live or
loaded), so a dashboard panel can call them on every refresh.

How the bubble is measured. Every stage records a span per micro-batch and
phase (``forward``/``backward``) with wall-clock start and end (ranks on one
machine share the clock). For each step, the step's window runs from the first
span's start to the last span's end over all stages; a rank's bubble is the
fraction of that window in which it ran none of its spans::

    bubble(rank, step) = 1 - busy(rank, step) / (last end - first start)

its median over the steps after ``warmup`` (the first steps pay for start-up;
the median shrugs off a step that another process on the machine disturbed).
Time spent sending and receiving between spans counts as idle, as it should:
the stage is not computing. Beside it, :func:`theory`: the schedule's published
formula (``view/bubbles.py``) fed with the measured median F, B (input
gradient) and W (weight gradient) span times; for GPipe and 1F1B with p ranks,
m micro-batches and v stages per rank: (p-1)/(v*m + p-1).

On a small CPU model a stage's compute is a fraction of a millisecond and the
timeline is mostly scheduling noise; ``stage_delay`` (teaching mode) makes
each forward sleep that long and each backward twice that (``stage_costs``
sets F, I and W apart), standing in for real work, so what is measured is the
schedule's shape.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from ..kernel.run import Run
from .bubbles import schedule_of
from .bubbles import theory as theory  # timeline.theory: each schedule's formula

SPAN_COLUMNS = ["rank", "step", "stage", "micro_batch", "phase", "start", "end"]
# phase: (legend name, colour). A split backward shows its input-gradient (I) and weight-gradient (W) halves.
PHASES = {
    "forward": ("forward", "#4C78A8"),
    "backward": ("backward", "#F58518"),
    "input": ("input grad", "#E45756"),
    "weight": ("weight grad", "#54A24B"),
}


def spans(run: Run) -> pd.DataFrame:
    """One row per (rank, step, stage, micro-batch, phase); ``start``/``end``
    in seconds since the run started.

    >>> spans(type("R", (), {"events": [], "started": 0.0})()).columns.tolist()
    ['rank', 'step', 'stage', 'micro_batch', 'phase', 'start', 'end']
    """
    rows = [{k: e[k] for k in SPAN_COLUMNS} for e in list(run.events) if e.get("type") == "span"]
    table = pd.DataFrame(rows, columns=SPAN_COLUMNS)
    table[["start", "end"]] = table[["start", "end"]] - run.started
    return table.sort_values(["step", "start"], ignore_index=True)


def theory_bubble(pp: int, micro_batches: int, stages_per_rank: int = 1) -> float:
    """(p-1)/(v*m + p-1): the idle fraction of a balanced pipeline.

    >>> round(theory_bubble(2, 4), 3)
    0.2
    """
    return (pp - 1) / (stages_per_rank * micro_batches + pp - 1)


def bubbles(run: Run, warmup: int = 1, schedule: str | None = None) -> pd.DataFrame:
    """Measured bubble per rank (median over steps after ``warmup``), with the
    schedule's theory beside it (``schedule`` None: told from the spans) fed
    with the measured median span times ``F``, ``B`` (input gradient, or the
    whole backward where it is not split) and ``W``."""
    columns = ["rank", "measured", "theory", "schedule", "F", "B", "W"]
    table = spans(run)
    table = table[table["step"] >= warmup]
    if table.empty:
        return pd.DataFrame(columns=columns)
    table = table.assign(busy=table["end"] - table["start"])
    window = table.groupby("step").agg(first=("start", "min"), last=("end", "max"))
    busy = table.groupby(["step", "rank"])["busy"].sum().reset_index()
    busy["bubble"] = 1 - busy["busy"] / (busy["step"].map(window["last"] - window["first"]))
    measured = busy.groupby("rank")["bubble"].median()
    stages_per_rank = int(table.groupby("rank")["stage"].nunique().max())
    pp = table["stage"].nunique() // stages_per_rank
    name = schedule or _schedule_launched(run) or schedule_of(table)
    time = table.groupby("phase")["busy"].median()
    f, b, w = (float(time.get(phase, 0.0)) for phase in ("forward", "input", "weight"))
    if "input" not in time:  # the backward is not split: B stands for all of it
        b = float(time.get("backward", 0.0))
    expected = theory(name, pp, table["micro_batch"].nunique(), stages_per_rank, f, b, w)
    return pd.DataFrame(
        {"rank": measured.index, "measured": measured.values, "theory": expected, "schedule": name}
    ).assign(F=f, B=b, W=w)


def _schedule_launched(run: Run) -> str | None:
    """The schedule in the run folder's config.json (built-in experiments), if any."""
    if not getattr(run, "is_config", False):
        return None
    try:
        return json.loads((Path(run.path) / "config.json").read_text()).get("schedule")
    except (OSError, ValueError, AttributeError):
        return None


def bubble_fraction(run: Run, warmup: int = 1) -> float:
    """The measured bubble averaged over ranks (see the module docstring)."""
    return float(bubbles(run, warmup)["measured"].mean())


def in_flight(run: Run) -> pd.DataFrame:
    """Per stage, the most micro-batches whose forward had ended and whose
    backward had not: how many micro-batches of activations the schedule kept
    alive at once (GPipe: all m; 1F1B: at most the number of stages)."""
    table = spans(run)
    most: dict[int, int] = {}
    for (_step, _rank, stage), group in table.groupby(["step", "rank", "stage"]):  # each replica's stage apart
        alive = peak = 0
        for phase in group.sort_values("start")["phase"]:
            # a split backward frees the activations with its W, the input gradient's part needs them
            alive += {"forward": 1, "backward": -1, "weight": -1}.get(phase, 0)
            peak = max(peak, alive)
        most[stage] = max(most.get(stage, 0), peak)
    return pd.DataFrame({"stage": list(most), "max_in_flight": list(most.values())})


def row_name(stage: int, rank: int) -> str:
    """A row's label, on two short lines: it fits beside a dashboard panel with its axis title."""
    return f"stage {stage}<br>rank {rank}"


def rows_of(table: pd.DataFrame) -> list[str]:
    """The chart's rows, first stage first: one per stage (and rank, when dp replicas hold the same stage)."""
    pairs = table[["stage", "rank"]].drop_duplicates().sort_values(["stage", "rank"])
    return [row_name(stage, rank) for stage, rank in pairs.itertuples(index=False)]


def traces(run: Run, last_steps: int = 2) -> list[Any]:
    """A Gantt chart of the last ``last_steps`` steps as plotly traces: one row
    per stage (and rank, when dp replicas hold the same stage), forward and
    backward bars coloured (a split backward's input-gradient and
    weight-gradient halves in colours of their own), bubbles as the gaps; each
    bar says its micro-batch where it is wide enough to read (``uniformtext``
    drops the rest).

    >>> span = {"type": "span", "rank": 0, "step": 0, "stage": 0, "micro_batch": 0, "phase": "forward",
    ...         "start": 1.0, "end": 1.5}
    >>> [t.name for t in traces(Run.from_events([span]))]
    ['forward', 'backward']
    """
    import plotly.graph_objects as go

    table = spans(run)
    if table.empty:
        return []
    table = table[table["step"] > table["step"].max() - last_steps]
    present = set(table["phase"])
    split = bool(present & {"input", "weight"})  # forward and backward always; the split halves when run
    shown = [p for p in PHASES if p in present or p == "forward" or (p == "backward" and not split)]
    out = []
    for phase in shown:
        name, colour = PHASES[phase]
        part = table[table["phase"] == phase]
        out.append(
            go.Bar(
                name=name,
                orientation="h",
                marker_color=colour,
                offsetgroup="spans",  # same row, not side by side
                base=part["start"],
                x=part["end"] - part["start"],
                y=[row_name(s, r) for s, r in zip(part["stage"], part["rank"], strict=True)],
                text=[f"{m}" for m in part["micro_batch"]],
                textposition="inside",
                insidetextanchor="middle",
                textfont={"size": 11, "color": "white"},
                hovertext=[
                    f"step {s}, micro-batch {m}, rank {r}"
                    for s, m, r in zip(part["step"], part["micro_batch"], part["rank"], strict=True)
                ],
            )
        )
    return out


ROW_PX = 56  # the height of one stage's row: bars and their labels readable at any stage count
FRAME_PX = 150  # title, legend, x axis and its title


def figure(run: Run, last_steps: int = 2) -> Any:
    """The Gantt chart as a ready figure (for notebooks; dashboards take
    :func:`traces`): as tall as its stages need, every stage's row labelled,
    the first stage on top, the legend between the title and the chart.

    >>> span = {"type": "span", "rank": 1, "step": 0, "stage": 1, "micro_batch": 0, "phase": "forward",
    ...         "start": 1.0, "end": 1.5}
    >>> fig = figure(Run.from_events([span]))
    >>> fig.layout.height, list(fig.layout.yaxis.tickvals)
    (206, ['stage 1<br>rank 1'])
    """
    import plotly.graph_objects as go

    rows = rows_of(spans(run)[lambda t: t["step"] > t["step"].max() - last_steps])
    return go.Figure(
        traces(run, last_steps),
        layout={
            "barmode": "overlay",
            "height": FRAME_PX + ROW_PX * max(len(rows), 1),
            "title": {"text": f"pipeline timeline, last {last_steps} steps (gaps: bubble)", "x": 0.01, "y": 1},
            "title_yref": "container",
            "title_yanchor": "top",
            "title_pad": {"t": 10},
            "title_font_size": 16,
            "margin": {"t": 80, "b": 50, "l": 20, "r": 20},
            "legend": {"orientation": "h", "x": 1, "xanchor": "right", "y": 1, "yanchor": "bottom"},
            "xaxis_title": "seconds since launch",
            "yaxis": {
                "title": "stage · rank",
                "type": "category",
                "categoryorder": "array",
                "categoryarray": rows,
                "tickmode": "array",
                "tickvals": rows,  # every stage's row named, however many
                "autorange": "reversed",  # stage 0 on top
                "automargin": True,
            },
            "uniformtext": {"minsize": 9, "mode": "hide"},  # micro-batch labels legible, or dropped
        },
    )


def memory_table(run: Run) -> pd.DataFrame:
    """One row per rank from its ``memory`` event: bytes of parameters,
    gradients, optimizer state and peak saved activations (and, from GPUs, the
    CUDA allocator's ``cuda_peak_bytes`` and ``cuda_reserved_bytes``)."""
    columns = ["rank", "param_bytes", "grad_bytes", "optimizer_bytes", "peak_activation_bytes"]
    memory = [e for e in list(run.events) if e.get("type") == "memory"]
    columns += [k for k in ("cuda_peak_bytes", "cuda_reserved_bytes") if any(k in e for e in memory)]
    rows = [{k: e.get(k) for k in columns} for e in memory]
    return pd.DataFrame(rows, columns=columns).sort_values("rank", ignore_index=True)
