"""The analysis helpers, on a hand-written run (no processes): the numbers
the staleness panel draws are the numbers in the events."""

from __future__ import annotations

from types import SimpleNamespace

import pandas as pd

from ddlkit import staleness


def _update(t, server, worker, step, read, applied, dropped=False, idle=0.0):
    return {
        "type": "update",
        "time": 100.0 + t,
        "rank": server,
        "worker": worker,
        "step": step,
        "read_version": read,
        "applied_version": applied,
        "staleness": applied - read,
        "dropped": dropped,
        "idle_s": idle,
    }


RUN = SimpleNamespace(
    started=100.0,
    world_size=3,
    events=[
        _update(0.1, 0, 1, 0, 0, 0),
        _update(0.2, 0, 2, 0, 0, 1, idle=0.05),
        _update(0.3, 0, 1, 1, 1, 2),
        _update(0.5, 0, 2, 1, 2, 5, dropped=True, idle=0.2),
        {"type": "finished", "rank": 0, "time": 101.0},
    ],
    metrics=pd.DataFrame(
        {
            "rank": [1, 1, 1, 2, 2],
            "step": [0, 1, 2, 0, 1],
            "time": [0.1, 0.3, 0.5, 0.2, 0.6],
            "loss": [2.0, 1.8, 1.6, 2.1, 1.9],
            "wait_s": [0.01, 0.02, 0.03, 0.0, 0.1],
        }
    ),
)


def test_table_histogram_and_per_worker():
    table = staleness.staleness_table(RUN)
    assert table["staleness"].tolist() == [0, 1, 1, 3] and table["time"].round(6).tolist() == [0.1, 0.2, 0.3, 0.5]
    assert staleness.histogram(table).values.tolist() == [[0, 1, 0], [1, 2, 0], [2, 0, 0], [3, 0, 1]]
    by_worker = staleness.per_worker(table)
    assert by_worker[1]["staleness"].tolist() == [0, 1] and by_worker[2]["dropped"].tolist() == [False, True]


def test_rank_activity_shows_step_rate_and_idle_time():
    activity = staleness.rank_activity(RUN).set_index("rank")
    assert activity.loc[1, "steps_per_s"] == 2 / 0.4 and activity.loc[2, "steps_per_s"] == 1 / 0.4
    assert round(activity.loc[1, "idle_s"], 6) == 0.06 and activity.loc[0, "role"] == "server"
    assert round(activity.loc[0, "idle_s"], 6) == 0.25


def test_panel_traces_and_loss_overlay():
    from ddlkit.kernel.run import Run
    from ddlkit.view.rundata import Context, RunData

    data = [RunData(Run.from_events(RUN.events, started=RUN.started, world_size=3))]
    histogram, over_time = staleness.histogram_panel(data, Context()), staleness.over_time_panel(data, Context())
    assert [t["name"] for t in histogram] == ["applied updates", "dropped"]
    assert [t["name"] for t in over_time] == ["worker 1", "worker 2"]
    assert list(histogram[0]["y"]) == [1, 2, 0, 0] and list(over_time[1]["y"]) == [1, 3]
    assert list(histogram[1]["base"]) == list(histogram[0]["y"])  # dropped updates stacked on the applied
    figure = staleness.figure(data[0].run)
    assert len(figure.data) == 4 and {t.xaxis for t in figure.data[2:]} == {"x2"}
    overlay = staleness.loss_vs_time({"bsp": RUN, "async": RUN})
    assert [t.name for t in overlay] == ["bsp", "async"] and len(overlay[0].x) == 5


def test_the_dashboard_shows_the_staleness_panels_only_for_runs_with_updates(tmp_path):
    from ddlkit import figures
    from ddlkit.kernel.run import Run

    with_updates = Run.from_events(RUN.events, started=100.0, world_size=3)
    titles = [a.text for a in figures.figure(with_updates).layout.annotations]
    assert "gradient staleness of applied updates" in titles and "staleness over time, per worker" in titles
    without = Run.from_events([{"type": "step", "rank": 0, "step": 0, "time": 100.1, "loss": 1.0}], started=100.0)
    assert not any("staleness" in a.text for a in figures.figure(without).layout.annotations)
