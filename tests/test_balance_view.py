"""Load-balance panels and tables, from events (no processes): the idle
fraction per rank, the shares a balancer set, the stage times before and
after auto cuts, pinned on the figure object (titles, axes, traces)."""

from __future__ import annotations

import pytest

import ddlkit
from ddlkit.kernel.run import Run
from ddlkit.view.panels import active_panels
from ddlkit.view.rundata import RunData


def balanced_run() -> Run:
    events: list[dict] = [
        {"type": "balance", "rank": r, "time": 1.0, "step": 0, "share": 32, "shares": [32, 32], "speeds": []}
        for r in (0, 1)
    ]
    for s in range(20):
        shares = [32, 32] if s < 10 else [42, 22]
        for r in (0, 1):
            row = {"type": "step", "rank": r, "step": s, "time": 1.0 + s, "loss": 1.0, "samples": shares[r],
                   "step_time": 0.1, "compute_s": 0.05, "comm_s": 0.05, "wait_s": 0.0}  # fmt: skip
            if s % 2 == 0:  # sampled steps: rank 0 waits for rank 1 until the re-share at step 10
                row |= {"idle_s": (0.04 if s < 10 else 0.01) if r == 0 else 0.002, "transfer_s": 0.01}
            events.append(row)
    events += [
        {"type": "balance", "rank": r, "time": 11.0, "step": 10, "share": [42, 22][r], "shares": [42, 22],
         "speeds": [2000.0, 1000.0]}
        for r in (0, 1)
    ]  # fmt: skip
    return Run.from_events(events, started=0.0)


def test_a_balanced_run_gets_idle_and_share_panels_with_a_line_per_rank():
    run = balanced_run()
    keys = [panel.key for panel in active_panels([RunData(run)])]
    assert keys[4:6] == ["idle", "shares"]
    fig = ddlkit.figures.figure(run, keys=["idle", "shares"])
    titles = [a.text for a in fig.layout.annotations]
    assert titles == [
        "idle fraction (waiting for the slowest peer): rank 0 solid, 1 dotted, 2 dashed",
        "share of the global batch (balance): rank 0 solid, 1 dotted, 2 dashed",
    ]
    assert fig.layout.xaxis.title.text == "step" and fig.layout.yaxis.title.text == "idle fraction"
    assert fig.layout.yaxis2.title.text == "samples per step"
    idle = [t for t in fig.data if t.xaxis == "x"]
    assert [t.name for t in idle] == ["rank 0", "rank 1"] and [t.line.dash for t in idle] == ["solid", "dot"]
    assert not any(t.showlegend for t in fig.data)  # ranks are told by the dash (in the titles), runs by colour
    assert list(idle[0].x) == list(range(0, 20, 2)) and idle[0].y[0] == pytest.approx(0.4)
    assert idle[0].y[-1] == pytest.approx(0.1) and max(idle[1].y) == pytest.approx(0.02)
    share = [t for t in fig.data if t.xaxis == "x2"]
    assert [list(t.y) for t in share] == [[32, 42, 42], [32, 22, 22]] and list(share[0].x) == [0, 10, 19]


def test_idle_table_throughput_and_shares_per_run():
    run = balanced_run()
    table = ddlkit.balance.idle_table(run, from_step=10)
    assert table["sampled_steps"].tolist() == [5, 5]
    assert table["idle_fraction"].round(3).tolist() == [0.1, 0.02]
    assert ddlkit.balance.idle_table(run)["idle_fraction"].round(3).tolist() == [0.25, 0.02]
    assert ddlkit.balance.throughput(run) == pytest.approx(640.0)  # 64 samples a 0.1 s step
    assert ddlkit.balance.shares(run).loc[10].tolist() == [42, 22]
    plain = Run.from_events([{"type": "step", "rank": 0, "step": 0, "time": 1.0, "step_time": 0.1}])
    with pytest.raises(
        ValueError,
        match="has no idle time: it is measured on sampled steps .time_every. by a lockstep strategy with two or more",
    ):
        ddlkit.balance.idle_table(plain)


def test_the_cuts_panel_shows_stage_times_before_and_after():
    report = {"type": "cuts", "rank": 0, "time": 1.0, "layer_s": [0.001, 0.1, 0.1, 0.002], "cuts": [2],
              "param_cuts": [1], "stage_s": [0.101, 0.102], "param_stage_s": [0.001, 0.202]}  # fmt: skip
    run = Run.from_events([report])
    assert "cuts" in [panel.key for panel in active_panels([RunData(run)])]
    fig = ddlkit.balance.cuts_figure(run)
    assert [t.name for t in fig.data] == ["by parameters [1]", "auto [2]"]
    assert list(fig.data[0].y) == pytest.approx([1.0, 202.0]) and list(fig.data[1].y) == pytest.approx([101.0, 102.0])
    assert list(fig.data[1].x) == ["stage 0", "stage 1"] and fig.layout.barmode == "group"
    assert fig.data[0].marker.color == "#aaaaaa" != fig.data[1].marker.color  # before grey, after in colour
    assert fig.layout.yaxis.title.text == "ms (forward + backward)" and fig.layout.height == 360


def test_runs_compared_by_name_say_what_differs_in_the_legend_and_title():
    """Notebook 08 compares balance=none with balance=dynamic: the legend said '0957d5 · 2 ranks' for each
    (seen in JupyterLab); runs given as {name: run} are called by their names."""
    none, dynamic = balanced_run(), balanced_run()
    fig = ddlkit.figures.figure({"balance=none": none, "balance=dynamic": dynamic}, keys=["idle", "throughput"])
    throughput = [t.name for t in fig.data if t.showlegend is not False]  # the legend: one line per run
    assert throughput == ["balance=none samples/s", "balance=dynamic samples/s"]
    assert fig.layout.title.text.startswith("balance=none: run events") and " | balance=dynamic: run " in (
        fig.layout.title.text
    )
