"""What the figures look like, asserted from the figure objects, so a layout
regression fails without a human looking: heights per stage, one tick label
per stage, legends on every multi-trace panel inside their own panel, title
boxes that no legend overlaps, axis titles everywhere. The screenshots the
browser test takes show the same."""

from __future__ import annotations

import random

import pytest

import ddlkit
from ddlkit.kernel.run import Run
from ddlkit.view import figures, staleness, timeline

STARTED = 1000.0
LINE = 1.3  # a line of text is about 1.3 times its font size tall


def every_event(world_size: int = 2, steps: int = 40, seed: int = 0) -> list[dict]:
    """Events for every panel: steps, controls, memory, pipeline spans, staleness updates."""
    rng = random.Random(seed)
    out: list[dict] = []
    for n in range(steps):
        for r in range(world_size):
            out.append(
                {"type": "step", "rank": r, "time": STARTED + 0.05 * n, "step": n, "loss": 2.3 * 0.97**n + rng.random()}
                | {"samples": 16, "step_time": 0.05, "compute_s": 0.03, "comm_s": 0.015, "wait_s": 0.005}
            )
    out += [
        {"type": "control_request", "time": STARTED + 1.0, "lr": 0.01},
        {"type": "control", "rank": 0, "time": STARTED + 1.1, "step": 22, "lr": 0.01},
    ]
    sizes = {"param_bytes": 2**20, "grad_bytes": 2**20, "optimizer_bytes": 2**21, "peak_activation_bytes": 2**19}
    out += [{"type": "memory", "rank": r, "time": STARTED + 2, "step": 3, **sizes} for r in range(world_size)]
    for stage in range(world_size):
        for m in range(4):
            for phase, start in (("forward", 2.0 + 0.02 * (m + stage)), ("backward", 2.3 + 0.04 * m)):
                out.append(
                    {"type": "span", "rank": stage, "step": steps - 1, "stage": stage, "micro_batch": m}
                    | {"phase": phase, "start": STARTED + start, "end": STARTED + start + 0.015}
                )
    for i in range(30):
        late = rng.choice([0, 1, 2, 3])
        out.append(
            {"type": "update", "rank": 0, "time": STARTED + 0.05 * i, "worker": 1 + i % 2, "step": i // 2}
            | {"read_version": i, "applied_version": i + late, "staleness": late, "dropped": late > 2, "idle_s": 0.0}
        )
    return out


def fake(name: str, world_size: int = 2, seed: int = 0, status: str = "done") -> Run:
    return Run.from_events(
        every_event(world_size, seed=seed), started=STARTED, world_size=world_size, status=status, run_id=name
    )


def panels_of(fig) -> list[dict]:
    """Each panel: its title, axes, domains and traces (the subplot titles are in panel order)."""
    out = []
    for index, annotation in enumerate(fig.layout.annotations):
        suffix = "" if index == 0 else str(index + 1)
        xaxis, yaxis = fig.layout[f"xaxis{suffix}"], fig.layout[f"yaxis{suffix}"]
        traces = [t for t in fig.data if t.xaxis == f"x{suffix}"]
        out.append({"title": annotation, "xaxis": xaxis, "yaxis": yaxis, "traces": traces})
    return out


def px_from_top(fig, y: float) -> float:
    """Paper coordinate y as pixels from the figure's top."""
    margin = fig.layout.margin
    return margin.t + (1 - y) * (fig.layout.height - margin.t - margin.b)


def title_box(fig) -> tuple[float, float]:
    title = fig.layout.title
    assert title.yref == "container" and title.y == 1 and title.yanchor == "top"
    return title.pad.t, title.pad.t + LINE * title.font.size


def legend_box(fig, legend) -> tuple[float, float]:
    """Top and bottom (px) of a vertical legend anchored at its top, from its entry count and font."""
    entries = sum(1 for t in fig.data if t.legend == legend.plotly_name and t.showlegend is not False)
    top = px_from_top(fig, legend.y)
    return top, top + entries * (legend.font.size + 9) + 6


def overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


@pytest.fixture(scope="module")
def dashboard_figure():
    base, other = fake("20261124-100000-aaaaaa"), fake("20261124-100001-bbbbbb", seed=1)
    return figures.figure([base, other], baseline=base)


def test_every_multi_trace_panel_has_a_legend_inside_its_own_corner(dashboard_figure):
    fig = dashboard_figure
    panels = panels_of(fig)
    assert len(panels) == 9  # every panel kind is in this figure
    for panel in panels:
        traces, title = panel["traces"], panel["title"].text
        if len(traces) < 2:
            continue
        (legend_name,) = {t.legend for t in traces}  # one legend per panel
        listed = [t.name for t in traces if t.showlegend is not False]
        assert listed, f"{title}: no trace in its legend"
        legend = fig.layout[legend_name]
        assert (legend.x, legend.y) == (panel["xaxis"].domain[1], panel["yaxis"].domain[1]), title
        assert (legend.xanchor, legend.yanchor, legend.xref, legend.yref) == ("right", "top", "paper", "paper")
        top, bottom = legend_box(fig, legend)
        assert bottom <= px_from_top(fig, panel["yaxis"].domain[0]), f"{title}: its legend spills out of the panel"
    names = {t.name for t in fig.data if t.showlegend is not False}
    for part in ("compute", "comm", "wait", "param", "grad", "optimizer", "peak_activation", "forward", "backward"):
        assert f"aaaaaa · 2 ranks {part}" in names  # the parts of a stacked bar are named, run by run
    assert {"aaaaaa · 2 ranks mean loss", "aaaaaa · 2 ranks each rank", "ideal", "measured speedup"} <= names


def test_no_legend_and_no_panel_title_overlaps_the_figure_title(dashboard_figure):
    fig = dashboard_figure
    title = title_box(fig)
    boxes = []
    for panel in panels_of(fig):
        annotation = panel["title"]
        assert annotation.yanchor == "bottom" and annotation.y >= panel["yaxis"].domain[1]  # above its panel
        bottom = px_from_top(fig, annotation.y)
        boxes.append((bottom - LINE * annotation.font.size, bottom))
    legends = {t.legend for t in fig.data}
    boxes += [legend_box(fig, fig.layout[name]) for name in legends]
    assert len(legends) >= 8
    for box in boxes:
        assert not overlap(title, box), (title, box)
    assert title[1] < min(top for top, _ in boxes)  # the title is above everything else


def test_every_panel_has_axis_titles(dashboard_figure):
    for panel in panels_of(dashboard_figure):
        assert panel["xaxis"].title.text and panel["yaxis"].title.text, panel["title"].text


def test_shades_of_a_stacked_bar_are_colours_the_legend_can_show(dashboard_figure):
    breakdown = [t for t in dashboard_figure.data if t.name.startswith("aaaaaa") and t.type == "bar"]
    colours = {t.name.split()[-1]: t.marker.color for t in breakdown}
    assert len({colours["compute"], colours["comm"], colours["wait"]}) == 3
    assert all(t.marker.opacity is None for t in breakdown)  # not opacity: a legend swatch ignores it


@pytest.mark.parametrize("stages", [2, 4])
def test_the_pipeline_timeline_grows_with_its_stages_and_names_every_stage(stages):
    fig = timeline.figure(fake("t", world_size=stages))
    rows = [f"stage {s}<br>rank {s}" for s in range(stages)]
    assert fig.layout.height == timeline.FRAME_PX + timeline.ROW_PX * stages  # 56 px a stage
    assert list(fig.layout.yaxis.tickvals) == rows and list(fig.layout.yaxis.categoryarray) == rows
    assert fig.layout.yaxis.autorange == "reversed" and fig.layout.yaxis.title.text  # stage 0 on top
    assert fig.layout.uniformtext.mode == "hide" and fig.layout.uniformtext.minsize >= 9  # legible or dropped
    legend = fig.layout.legend
    assert legend.orientation == "h" and (legend.y, legend.yanchor) == (1, "bottom")  # above the chart
    legend_top = px_from_top(fig, 1) - LINE * 12 - 10
    assert not overlap(title_box(fig), (legend_top, px_from_top(fig, 1)))
    assert [t.name for t in fig.data] == ["forward", "backward"]


def test_the_dashboard_pipeline_panel_names_every_stage(dashboard_figure):
    (pipeline,) = [p for p in panels_of(dashboard_figure) if p["title"].text.startswith("pipeline")]
    axis = pipeline["yaxis"]
    assert (axis.type, axis.dtick, axis.autorange) == ("category", 1, "reversed")


def test_staleness_figure_compares_runs_side_by_side_with_axis_titles():
    fig = staleness.figure({"bsp": fake("bsp"), "async": fake("async", seed=3)})
    applied = [t for t in fig.data if t.name.endswith("applied updates")]
    assert [t.name for t in applied] == ["bsp applied updates", "async applied updates"]
    assert applied[0].offset != applied[1].offset and applied[0].marker.color != applied[1].marker.color
    assert all(fig.layout[axis].title.text for axis in ("xaxis", "yaxis", "xaxis2", "yaxis2"))
    assert {t.name for t in fig.data if t.xaxis == "x2"} == {
        "bsp worker 1",
        "bsp worker 2",
        "async worker 1",
        "async worker 2",
    }


def test_the_title_says_how_the_run_ended_even_if_it_ends_during_a_refresh(monkeypatch):
    run = Run.from_events(every_event()[:10], started=STARTED, world_size=2, status="running", run_id="live")
    original = figures.title_of
    calls = []

    def title_then_end(data):
        title = original(data)
        calls.append(title)
        if len(calls) == 3:  # the run ends right after a refresh read its title
            run.finish("stopped", None)
            run.end()
        return title

    monkeypatch.setattr(figures, "title_of", title_then_end)
    dashboard = ddlkit.Dashboard(run, interval=0.01)
    dashboard.join(5)
    assert not dashboard.running and "(running)" in calls[2]
    assert dashboard.figure.layout.title.text.endswith("(stopped)")
