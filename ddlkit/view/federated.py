"""Reading federated runs: held-out accuracy per round (any run with
``eval_every``), participation and drops, bytes and simulated time per round,
the clients' label mix; as tables, as dashboard panels, and as one figure.

A run restarted from a checkpoint redoes rounds: the tables keep the latest
attempt's event of each round.

>>> round0 = {"type": "round", "rank": 0, "time": 1.0, "round": 0, "sampled": 10, "completed": 8, "partial": 1,
...           "dropped": 2, "bytes_down": 100, "bytes_up": 80, "sim_s": 1.5, "wall_s": 0.1}
>>> evals = [{"type": "eval", "rank": 0, "time": 1.0 + r, "step": r, "loss": 1.0, "accuracy": a, "samples": 9}
...          for r, a in enumerate([0.1, 0.5, 0.8])]
>>> run = Run.from_events([round0, *evals])
>>> rounds_table(run)[["round", "completed", "dropped"]].values.tolist()
[[0, 8, 2]]
>>> rounds_to(run, accuracy=0.75)
2
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..kernel.run import Run
from .rundata import COLORS, Context, RunData
from .traces import marker_label, series_name

ROUND_COLUMNS = ["round", "sampled", "completed", "partial", "dropped", "bytes_down", "bytes_up", "sim_s", "wall_s"]


def latest(events: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """One event per ``key`` value, the last one recorded (a restarted run redoes rounds), in key order."""
    return sorted({e[key]: e for e in events}.values(), key=lambda e: e[key])


def rounds_table(run: Run) -> pd.DataFrame:
    """One row per round: participation, bytes, simulated and wall seconds (and loss, epsilon, knobs if any)."""
    rows = latest([e for e in run.events if e["type"] == "round"], "round")
    table = pd.DataFrame(rows)
    if table.empty:
        return pd.DataFrame(columns=ROUND_COLUMNS)
    return table.drop(columns=[c for c in ("type", "rank", "time", "attempt") if c in table])


def evals_table(run: Run) -> pd.DataFrame:
    """One row per evaluation: ``step`` (rounds done), loss, accuracy."""
    rows = latest([e for e in run.events if e["type"] == "eval"], "step")
    return pd.DataFrame(rows, columns=["step", "loss", "accuracy", "samples"])


def rounds_to(run: Run, accuracy: float) -> int | None:
    """The first round count after which the held-out accuracy reached ``accuracy`` (None: never)."""
    table = evals_table(run)
    reached = table[table["accuracy"] >= accuracy]
    return int(reached["step"].iloc[0]) if len(reached) else None


def label_counts(run: Run) -> np.ndarray:
    """Training samples per client (rows) and label (columns), from the run's ``partition`` event."""
    event = next(e for e in run.events if e["type"] == "partition")
    return np.array(event["counts"])


# ---- dashboard panels: (runs, ctx) -> traces ------------------------------------------------------
def accuracy_traces(runs: list[RunData], ctx: Context) -> list[Any]:
    """Held-out accuracy per round (or step), runs overlaid; ▼ where a live knob took effect."""
    out: list[Any] = []
    for data in runs:
        evals = latest(data.kept["eval"], "step")
        x = [e["step"] for e in evals]
        y = [e.get("accuracy", np.nan) for e in evals]
        out.append(
            dict(
                type="scatter",
                x=x,
                y=y,
                mode="lines+markers",
                name=series_name(data, runs, "accuracy"),
                legendgroup=data.run.id,
                line={"color": data.color, "width": 2},
                marker={"size": 5},
            )
        )
        changes = [e for e in latest(data.kept["round"], "round") if e.get("knobs")]
        at = [float(np.interp(e["round"], x, y)) if x else 0.0 for e in changes]
        out.append(
            dict(
                type="scatter",
                x=[e["round"] for e in changes],
                y=at,
                mode="markers+text",
                text=[marker_label(e) for e in changes],
                textposition="top center",
                showlegend=False,
                name=series_name(data, runs, "knobs"),
                legendgroup=data.run.id,
                marker={"symbol": "triangle-down", "size": 11, "color": "black"},
            )
        )
    return out  # fmt: skip


def participation_traces(runs: list[RunData], ctx: Context) -> list[Any]:
    """Per round: clients whose whole work arrived, partial work, dropped (stacked; runs side by side)."""
    out: list[Any] = []
    width = 0.8 / max(len(runs), 1)
    for index, data in enumerate(runs):
        rounds = latest(data.kept["round"], "round")
        x = [e["round"] for e in rounds]
        base = np.zeros(len(rounds))
        for name, shade in (("whole", 1.0), ("partial", 0.6), ("dropped", 0.25)):
            height = np.array([_count(e, name) for e in rounds], dtype=float)
            out.append(
                dict(
                    type="bar",
                    x=x,
                    y=height,
                    base=base,
                    width=width,
                    offset=index * width - 0.4,
                    name=series_name(data, runs, name),
                    legendgroup=data.run.id,
                    showlegend=False,
                    marker={"color": data.color, "opacity": shade},
                    hovertemplate=f"round %{{x}}: %{{y}} {name}<extra></extra>",
                )
            )
            base = base + height
    return out  # fmt: skip


def _count(event: dict[str, Any], name: str) -> int:
    if name == "whole":
        return int(event["completed"] - event["partial"])
    return int(event[name])


def bytes_traces(runs: list[RunData], ctx: Context) -> list[Any]:
    """Simulated bytes down (to the clients) and up (to the server) per round, in MB."""
    out: list[Any] = []
    for data in runs:
        rounds = latest(data.kept["round"], "round")
        x = [e["round"] for e in rounds]
        for key, dash in (("bytes_down", "solid"), ("bytes_up", "dot")):
            out.append(
                dict(
                    type="scatter",
                    x=x,
                    y=[e[key] / 1e6 for e in rounds],
                    mode="lines",
                    name=series_name(data, runs, key.replace("bytes_", "MB ")),
                    legendgroup=data.run.id,
                    showlegend=False,
                    line={"color": data.color, "dash": dash},
                )
            )
    return out  # fmt: skip


def label_traces(runs: list[RunData], ctx: Context) -> list[Any]:
    """The first run's clients' label mix: a heatmap, clients across, labels up."""
    data = next(d for d in runs if d.kept["partition"])
    counts = np.array(data.kept["partition"][-1]["counts"])
    return [
        dict(type="heatmap", z=counts.T.tolist(), x=list(range(len(counts))), y=list(range(counts.shape[1])),
             colorscale="Blues", showscale=False, name="samples", hovertemplate="client %{x}, label %{y}: %{z}"
             "<extra></extra>")
    ]  # fmt: skip


def figure(runs: dict[str, Run] | Run) -> go.Figure:
    """Accuracy per round (runs overlaid, labelled by the dict's keys), participation,
    bytes per round, and the first run's label heatmap, as one static figure."""
    named = runs if isinstance(runs, dict) else {runs.id: runs}
    data = [RunData(run, COLORS[i % len(COLORS)], name=label) for i, (label, run) in enumerate(named.items())]
    ctx = Context()
    fig = make_subplots(rows=2, cols=2, subplot_titles=[title for title, _ in PARTS], vertical_spacing=0.14)
    for index, (_, draw) in enumerate(PARTS):
        for trace in draw(data, ctx):
            fig.add_trace(trace, row=index // 2 + 1, col=index % 2 + 1)
    for index, (x_title, y_title) in enumerate(AXES):
        fig.update_xaxes(title_text=x_title, row=index // 2 + 1, col=index % 2 + 1)
        fig.update_yaxes(title_text=y_title, row=index // 2 + 1, col=index % 2 + 1)
    fig.update_layout(height=720, barmode="overlay", legend={"orientation": "h", "y": -0.08})
    return fig


PARTS = (
    ("held-out accuracy vs round (▼ live knob applied)", accuracy_traces),
    ("clients per round: whole / partial / dropped", participation_traces),
    ("MB per round: down (solid) / up (dotted)", bytes_traces),
    ("training samples per client and label", label_traces),
)
AXES = (("rounds done", "accuracy"), ("round", "clients"), ("round", "MB"), ("client", "label"))
