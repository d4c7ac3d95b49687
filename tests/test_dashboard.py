"""The dashboard's data path: events in, figure data out; downsampling;
control markers; conditional panels; the refresh thread's life."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import ddlkit
from ddlkit.kernel.run import Run
from ddlkit.view import figures, panels, traces
from ddlkit.view.panels import Panel, has_events, per_run
from ddlkit.view.rundata import RunData, downsample

STARTED = 1000.0


def fake_run(tmp_path, world_size=2, events=(), name="fake", status="running"):
    (tmp_path / name).mkdir()
    return Run.from_events(
        list(events),
        started=STARTED,
        world_size=world_size,
        status=status,
        run_id=name,
        path=tmp_path / name,
        meta={"target": "config"},
    )


def step(rank, number, loss, samples=16, step_time=0.1, compute=0.06, comm=0.03, wait=0.01):
    return {
        "type": "step",
        "rank": rank,
        "time": STARTED + number + 0.1 * rank,
        "step": number,
        "loss": loss,
        "samples": samples,
        "lr": 0.05,
        "step_time": step_time,
        "compute_s": compute,
        "comm_s": comm,
        "wait_s": wait,
    }


def two_rank_events(steps=4):
    return [step(rank, n, loss=10.0 - n + rank, step_time=0.1 * (1 + rank)) for n in range(steps) for rank in (0, 1)]


def traces_by_name(fig, name):
    return [t for t in fig.data if t.name == name]


def test_events_become_per_rank_and_mean_loss_throughput_and_breakdown(tmp_path):
    run = fake_run(tmp_path, events=two_rank_events())
    fig = figures.figure(run)
    (rank0, _), (rank1, _) = traces_by_name(fig, "rank 0"), traces_by_name(fig, "rank 1")  # vs step, vs time
    assert list(rank0.x) == [0, 1, 2, 3] and list(rank0.y) == [10, 9, 8, 7]
    assert list(rank1.y) == [11, 10, 9, 8]
    mean_vs_step, mean_vs_time = traces_by_name(fig, "mean loss")
    assert list(mean_vs_step.y) == [10.5, 9.5, 8.5, 7.5]
    assert list(mean_vs_time.x) == pytest.approx([0.1, 1.1, 2.1, 3.1])  # the later rank's time, since launch
    (rate,) = traces_by_name(fig, "samples/s")
    assert list(rate.y) == pytest.approx([32 / 0.2] * 4)  # both ranks' samples over the slower rank's step time
    compute, comm, wait = (traces_by_name(fig, name)[0] for name in ("compute", "comm", "wait"))
    assert list(compute.y) == pytest.approx([0.06] * 4) and list(comm.base) == pytest.approx([0.06] * 4)
    assert list(wait.base) == pytest.approx([0.09] * 4)  # stacked: wait sits on compute + comm


def test_a_step_only_one_rank_logged_is_not_in_the_throughput(tmp_path):
    run = fake_run(tmp_path, events=two_rank_events(3) + [step(0, 3, loss=1.0)])
    steps, _ = RunData(run).throughput()
    assert list(steps) == [0, 1, 2]


def test_downsampling_is_bounded_and_keeps_first_recent_and_extremes():
    rng = np.random.default_rng(0)
    y = rng.normal(size=200_000)
    y[1234], y[98765] = 50.0, -50.0  # spikes in the old part must survive
    keep = downsample(y, max_points=1000, recent=200)
    assert len(keep) <= 1000
    assert keep[0] == 0
    assert list(keep[-200:]) == list(range(200_000 - 200, 200_000))  # the newest points, all of them
    assert 1234 in keep and 98765 in keep
    assert (np.diff(keep) > 0).all()  # in order, no duplicates
    assert list(downsample(np.arange(10.0))) == list(range(10))  # small series untouched


def test_downsampling_survives_nan():
    y = np.full(5000, np.nan)
    y[100] = 1.0
    keep = downsample(y, max_points=500, recent=50)
    assert 100 in keep and len(keep) <= 500


def test_control_markers_sit_on_the_mean_loss_applied_at_their_step(tmp_path):
    events = two_rank_events(6)
    events.insert(5, {"type": "control_request", "time": STARTED + 2.0, "lr": 0.01})
    events.append({"type": "control", "rank": 0, "time": STARTED + 3.0, "step": 3, "lr": 0.01})
    events.append({"type": "control", "rank": 0, "time": STARTED + 4.0, "step": 4, "paused": True})
    fig = figures.figure(fake_run(tmp_path, events=events))
    asked, applied = traces_by_name(fig, "control asked")[0], traces_by_name(fig, "control applied")[0]
    # asked: no label; applied: labelled, every other label a line higher (seen in JupyterLab: "lr=0.002" and
    # "relaunch" overlapped when they sat on one line)
    assert list(applied.text) == ["lr=0.01", "paused<br>\u00a0"] and asked.text is None
    assert asked.hovertext == ("asked: lr=0.01",) and applied.hovertext[0] == "applied: lr=0.01"
    assert applied.x[0] == 3 and applied.y[0] == pytest.approx(7.5)  # on the mean loss at step 3
    assert asked.x[0] == pytest.approx(1.9, abs=0.11)  # asked 2.0 s after launch: about step 2
    # The applied marker is drawn after (on top of) the asked one, larger: they may share pixels.
    order = [t.name for t in fig.data if t.xaxis == "x"]
    assert order.index("control applied") > order.index("control asked")
    assert applied.marker.size > asked.marker.size and applied.marker.symbol == "triangle-down"


def test_conditional_panels_appear_only_with_their_data(tmp_path):
    run = fake_run(tmp_path, events=two_rank_events())
    data, ctx = figures.load(run)
    assert [p.key for p in panels.active_panels(data, ctx)] == ["loss_step", "loss_time", "throughput", "breakdown"]
    run.record(
        [
            {
                "type": "memory",
                "rank": r,
                "time": STARTED + 5,
                "param_bytes": 2**20,
                "grad_bytes": 2**20,
                "optimizer_bytes": 0,
                "peak_activation_bytes": 2**19,
            }
            for r in (0, 1)
        ]
    )
    data[0].update()
    assert "memory" in [p.key for p in panels.active_panels(data, ctx)]
    memory = panels.panel_traces(data, ctx, [p for p in panels.PANELS if p.key == "memory"])[0]
    assert [t["name"] for t in memory] == ["param", "grad", "optimizer", "peak_activation"]
    assert list(memory[-1]["base"]) == [2.0, 2.0]  # MiB stacked under the activations


def test_a_registered_panel_is_one_entry_and_follows_its_events(tmp_path, monkeypatch):
    def probes(run):  # what a helper module exposes: traces(run) -> list of traces
        return [{"type": "bar", "name": "probes", "x": [e["value"] for e in run.events if e["type"] == "probe"]}]

    monkeypatch.setattr(
        panels, "PANELS", panels.PANELS + [Panel("probe", "probe panel", per_run(probes), when=has_events("probe"))]
    )
    run = fake_run(tmp_path, events=two_rank_events())
    assert "probes" not in [t.name for t in figures.figure(run).data]
    run.record([{"type": "probe", "rank": 1, "time": STARTED + 9, "value": 1}])
    assert traces_by_name(figures.figure(run), "probes")[0].x == (1,)


def test_speedup_against_a_baseline_with_the_ideal_line(tmp_path):
    base = fake_run(
        tmp_path, world_size=1, name="base", events=[step(0, n, 1.0, samples=32, step_time=0.4) for n in range(3)]
    )
    fast = fake_run(
        tmp_path,
        world_size=2,
        name="fast",
        events=[step(r, n, 1.0, samples=16, step_time=0.1) for n in range(3) for r in (0, 1)],
    )
    fig = figures.figure([base, fast], baseline=base, keys=["speedup"])
    (ideal,) = traces_by_name(fig, "ideal")
    (measured,) = traces_by_name(fig, "measured speedup")
    assert list(ideal.x) == [1, 2] and list(ideal.y) == [1.0, 2.0]
    assert list(measured.x) == [1, 2] and list(measured.y) == pytest.approx([1.0, 4.0])  # 320 vs 80 samples/s


def test_several_runs_overlay_with_their_own_names_and_colours(tmp_path):
    one = fake_run(tmp_path, name="one", events=two_rank_events())
    two = fake_run(tmp_path, name="two", events=two_rank_events())
    fig = figures.figure([one, two])
    means = [t for t in fig.data if t.name.endswith("mean loss")]
    assert len(means) == 4 and len({t.line.color for t in means}) == 2
    assert {t.legendgroup for t in means} == {"one", "two"}


def test_update_reads_only_new_events_and_matches_a_fresh_read(tmp_path):
    events = two_rank_events(10)
    run = fake_run(tmp_path, events=events[:7])
    live = RunData(run)
    run.record(events[7:])
    assert live.update() == len(events) - 7
    assert live.update() == 0
    fresh = RunData(run)
    for name in ("loss_sum", "samples_sum", "step_time_max", "count"):
        assert np.array_equal(live.per_step.arrays[name][:10], fresh.per_step.arrays[name][:10])
    assert np.array_equal(live.ranks[1]["loss"].values, fresh.ranks[1]["loss"].values)


def test_refresh_updates_the_widget_in_place_and_lays_out_again_for_a_new_rank(tmp_path):
    run = fake_run(tmp_path, world_size=3, events=two_rank_events(3))
    dashboard = ddlkit.Dashboard(run, interval=3600)
    first_traces = dashboard.figure.data
    run.record([step(r, 3, loss=1.0) for r in (0, 1)])
    dashboard.refresh()
    assert dashboard.figure.data[0] is first_traces[0]  # the same trace, new data
    assert list(traces_by_name(dashboard.figure, "rank 0")[0].y)[-1] == 1.0
    run.record([step(2, 0, loss=3.0)])  # a third rank reports: new traces, new layout
    dashboard.refresh()
    assert len(traces_by_name(dashboard.figure, "rank 2")) == 2
    dashboard.close()
    assert not dashboard.running


def dashboard_threads():
    return [t for t in threading.enumerate() if t.name == "ddlkit-dashboard"]


def test_the_refresh_thread_ends_after_the_run_with_a_last_refresh(tmp_path):
    run = fake_run(tmp_path, events=two_rank_events(2))
    dashboard = ddlkit.Dashboard(run, interval=0.05)
    assert dashboard.running
    run.record([step(r, 2, loss=0.5) for r in (0, 1)])
    run.finish("done", None)
    run.end()  # the events above arrived just before the end
    dashboard.join(5)
    assert not dashboard.running and dashboard_threads() == []
    assert list(traces_by_name(dashboard.figure, "mean loss")[0].y)[-1] == 0.5
    assert "(done)" in dashboard.figure.layout.title.text


def test_closing_the_dashboard_stops_its_thread(tmp_path):
    run = fake_run(tmp_path, events=two_rank_events(2))
    dashboards = [ddlkit.Dashboard(run, interval=0.05) for _ in range(3)]
    time.sleep(0.2)
    assert len(dashboard_threads()) == 3
    for dashboard in dashboards:
        dashboard.close()
    assert dashboard_threads() == []
    refreshes = dashboards[0].refreshes
    time.sleep(0.2)
    assert dashboards[0].refreshes == refreshes


def test_a_finished_run_gets_no_thread(tmp_path):
    run = fake_run(tmp_path, events=two_rank_events(2))
    run.finish("stopped", None)
    run.end()
    dashboard = ddlkit.Dashboard(run)
    assert not dashboard.running and len(traces_by_name(dashboard.figure, "mean loss")) == 2


def test_a_live_two_rank_run_draws_every_step_and_the_thread_ends(runs_dir):
    run = ddlkit.launch(
        ddlkit.RunConfig(strategy="data", world_size=2, steps=40, device="cpu", run_dir=runs_dir), echo=False
    )
    dashboard = ddlkit.Dashboard(run)
    run.wait(120)
    dashboard.join(5)
    assert not dashboard.running and dashboard.refreshes >= 2
    for rank in (0, 1):
        assert list(traces_by_name(dashboard.figure, f"rank {rank}")[0].x) == list(range(40))
    assert len(dashboard_threads()) == 0


def test_the_report_is_the_same_panels_as_html(runs_dir, tmp_path):
    run = ddlkit.launch(
        ddlkit.RunConfig(strategy="single", world_size=1, steps=5, device="cpu", run_dir=runs_dir), echo=False
    ).wait(120)
    html = ddlkit.report(run, tmp_path / "report.html").read_text()
    for title in ("loss vs step", "loss vs wall time", "throughput", "time per step: compute"):
        assert title in html


def test_a_marker_names_only_the_controls_that_changed():
    event = {"type": "control", "rank": 0, "time": 1.0, "step": 3, "attempt": 2, "lr": 0.01, "paused": True}
    assert traces.marker_label(event) == "lr=0.01, paused"
    assert traces.marker_label({"type": "control", "step": 9, "stop": True, "save": True}) == "relaunch"
    assert traces.marker_label({"type": "control", "step": 9, "stop": True}) == "stop"


def test_a_dashboard_opened_on_a_long_run_reads_it_in_slices_and_catches_up(tmp_path, monkeypatch):
    from ddlkit.view import dashboard as dashboard_module

    monkeypatch.setattr(dashboard_module, "MAX_EVENTS_PER_REFRESH", 100)
    run = fake_run(tmp_path, events=two_rank_events(steps=250), status="done")  # 500 events: five slices
    dashboard = ddlkit.Dashboard(run, interval=0.01)
    assert dashboard.data[0].cursor == 100  # the first refresh read one slice, not the backlog
    assert dashboard.running  # the run has ended, but its events are not all drawn yet
    dashboard.join(10)
    assert not dashboard.running and dashboard.data[0].caught_up()
    against_step = traces_by_name(dashboard.figure, "mean loss")[0]
    assert against_step.x[-1] == 249  # the last step is drawn
