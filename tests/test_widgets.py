"""The ControlPanel, driven as a browser would (widget values, clicks),
without a browser: refusals before launch, knobs from the table, and the
buttons and the lr slider acting on a real run."""

from __future__ import annotations

import time

import pytest

import ddlkit
from ddlkit import ControlPanel, RunConfig


def wait_until(condition, timeout, what="condition"):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"{what} not met within {timeout} s"
        time.sleep(0.02)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"model": "cnn", "dataset": "sonnets"}, "model='cnn' cannot train on dataset='sonnets'"),
        ({"strategy": "single", "world_size": 2}, "world_size=2 is invalid for strategy='single'"),
    ],
)
def test_an_invalid_combination_is_refused_in_the_panel_before_launch(runs_dir, no_leftovers, changes, message):
    panel = ControlPanel(RunConfig(steps=20, device="cpu", run_dir=runs_dir))
    assert not panel.run_button.disabled and panel.status.value == "ready"
    for name, value in changes.items():
        panel.fields[name].value = value
    assert panel.run_button.disabled
    assert message in panel.status.value.replace("&#x27;", "'")
    panel.run_button.click()  # even if a click gets through
    assert panel.run is None and no_leftovers == []  # nothing was launched
    assert message in panel.error.value.replace("&#x27;", "'") and panel.error.layout.display is None
    panel.fields["dataset"].value, panel.fields["model"].value = "digits", "mlp"
    panel.fields["strategy"].value, panel.fields["world_size"].value = "data", 2
    assert not panel.run_button.disabled and panel.status.value == "ready"


def test_run_lr_pause_resume_stop_act_on_a_real_run(runs_dir):
    panel = ControlPanel(RunConfig(steps=1_000_000, batch_size=16, device="cpu", run_dir=runs_dir, hang_timeout=60))
    panel.run_button.click()
    run = panel.run
    assert run is not None and panel.run_button.disabled and not panel.stop_button.disabled
    assert (
        panel.dashboard_box.children == (panel.dashboard.widget,)
        and panel.dashboard.widget.children[0] is panel.dashboard.figure
    )
    wait_until(lambda: run.steps_done >= 30, 60, "30 steps")

    moved = time.time()
    panel.fields["lr"].value = 0.01
    wait_until(lambda: any(e["type"] == "control" and e.get("lr") == 0.01 for e in run.events), 5, "lr applied")
    assert time.time() - moved < 1.0

    def marked():
        applied = [t for t in panel.dashboard.figure.data if t.name == "control applied"]
        return any("lr=0.01" in (trace.text or ()) for trace in applied)

    wait_until(marked, 2, "lr marked on the loss curves")

    panel.pause_button.click()
    assert panel.pause_button.description == "Resume"
    time.sleep(0.5)
    held = run.steps_done
    time.sleep(1.0)
    assert run.steps_done == held and run.status == "running"
    panel.pause_button.click()
    wait_until(lambda: run.steps_done > held + 5, 10, "steps after resume")
    assert panel.pause_button.description == "Pause"

    wait_until(lambda: panel.progress.value > 0 and "running" in panel.status.value, 2, "status and progress")
    panel.stop_button.click()
    assert run.status == "stopped"
    assert "stopped" in panel.status.value and not panel.dashboard.running
    assert not panel.run_button.disabled and panel.stop_button.disabled and panel.pause_button.disabled
    assert panel.progress.value == run.steps_done


def test_a_failing_rank_shows_in_the_error_box(runs_dir):
    panel = ControlPanel(
        RunConfig(steps=50, device="cpu", run_dir=runs_dir, fault={"rank": 1, "step": 3, "kind": "exception"})
    )
    panel.run_button.click()
    with pytest.raises(ddlkit.RunFailed):
        panel.run.wait(120)
    panel.dashboard.join(5)
    assert panel.run.status == "failed" and "failed" in panel.status.value
    assert "rank 1" in panel.error.value and "Traceback" in panel.error.value
    assert panel.error.layout.display is None and not panel.run_button.disabled


def test_the_straggler_row_sets_the_config_and_steers_a_running_ps_run(runs_dir):
    panel = ControlPanel(
        RunConfig(strategy="ps", world_size=3, steps=1_000_000, batch_size=8, device="cpu", run_dir=runs_dir)
    )
    assert [w.description for w in panel.knob_box.children] == ["servers", "sync", "staleness bound (ssp)"]
    panel.fields["sync"].value = "ssp"
    panel.slow_rank.value, panel.slowdown.value = 9, 3.0
    assert panel.run_button.disabled and "slowdown" in panel.status.value  # rank 9 does not exist
    panel.slow_rank.value = 2
    assert panel.config().slowdown == {2: 3.0} and panel.config().sync == "ssp"
    run = panel.start()
    wait_until(lambda: run.steps_done > 3, 60, "the run makes steps")
    panel.slow_rank.value = 1  # move the straggler: rank 2 is freed, rank 1 slowed, live
    wait_until(lambda: any(e["type"] == "control" for e in run.events), 10, "the ranks apply the change")
    (applied,) = [e for e in run.events if e["type"] == "control"]
    assert applied["slowdown"] == {"2": 1.0, "1": 3.0}
    panel.stop()
    assert run.status == "stopped"


def test_a_default_panel_changes_the_layout_of_a_running_run_and_reverts_what_cannot_work(runs_dir):
    panel = ControlPanel(
        RunConfig(strategy="data", world_size=2, steps=100_000, batch_size=8, device="cpu", run_dir=runs_dir)
    )
    assert panel.config().checkpoint_every is None  # a default panel: no checkpoints asked for
    run = panel.start()
    wait_until(lambda: run.steps_done > 10, 60, "steps")

    def refused(field, value, running, why):
        panel.fields[field].value = value
        shown = panel.error.value.replace("&#x27;", "'")
        assert "layout not changed" in shown and why in shown, shown
        assert panel.fields[field].value == running and run.status == "running"  # the widget went back

    refused("world_size", 3, 2, "must split evenly over 3")  # 16 samples a step do not split over 3 ranks
    refused("world_size", 0, 2, "world_size=0 is invalid")  # not clamped to 1 in silence: refused, and why
    refused("strategy", "ps", "data", "strategy='ps' is invalid for a relaunch")
    assert not [e for e in run.events if e["type"] == "layout"]

    panel.fields["world_size"].value = 1  # the same run goes on with one rank of 16
    assert panel.error.layout.display == "none" and panel.error.value == ""  # the stale refusal is gone
    wait_until(lambda: any(e["type"] == "layout" for e in run.events), 60, "the new layout")
    (layout,) = [e for e in run.events if e["type"] == "layout"]
    assert (layout["world_size"], layout["batch_size"]) == (1, 16)
    wait_until(lambda: run.steps_done > layout["from_step"] + 5, 60, "steps in the new layout")
    wait_until(lambda: panel.fields["batch_size"].value == 16, 5, "the panel shows the new per-replica batch")
    rows = run.metrics
    assert set(rows[rows["step"] >= layout["from_step"]]["rank"]) == {0}  # one rank now
    assert sorted(rows["step"].unique()) == list(range(rows["step"].max() + 1))  # no step lost

    refused("strategy", "pipeline", "data", "world_size=1 is invalid for strategy='pipeline'")
    panel.stop()
    assert run.status == "stopped" and panel.error.value == ""  # a refusal about a stopped run is stale
    assert panel.config().world_size == 1 and panel.config().batch_size == 16  # the next Run is what is shown


def test_a_layout_change_made_while_the_dashboard_shows_the_last_one_is_not_lost():
    """The dashboard's thread sets the widgets to a relaunch's layout (``follow``)
    while a cell changes the strategy: the change waits its turn and is acted on,
    not taken for one of the dashboard's own (CI saw that as an empty error box)."""
    import threading

    import ipywidgets as widgets

    from ddlkit.view.relayout import LayoutWidgets

    boxes = {
        "world_size": widgets.IntText(value=2),
        "strategy": widgets.Dropdown(options=["data", "pipeline"], value="data"),
        "batch_size": widgets.IntText(value=8),
    }
    layout = LayoutWidgets(boxes, show_error=lambda text: None)
    layout.start(RunConfig(strategy="data", world_size=2))
    asked: list[tuple] = []

    class RunBeingRelaid:
        events = [{"type": "layout", "world_size": 1, "strategy": "data", "batch_size": 16}]

        def relaunch(self, world_size, strategy, **knobs):
            asked.append((world_size, strategy))

    run = RunBeingRelaid()
    config = RunConfig(strategy="pipeline", world_size=2)
    for name in ("world_size", "strategy"):
        boxes[name].observe(lambda _: layout.changed(run, lambda: config), "value")
    validating, go_on = threading.Event(), threading.Event()
    boxes["batch_size"].observe(lambda _: (validating.set(), go_on.wait(10)), "value")  # the panel validates here

    dashboard = threading.Thread(target=layout.follow, args=(run,))
    dashboard.start()
    assert validating.wait(10) and boxes["batch_size"].value == 16  # the cell sees the new batch already
    cell = threading.Thread(target=lambda: setattr(boxes["strategy"], "value", "pipeline"))
    cell.start()
    cell.join(0.3)
    go_on.set()
    dashboard.join(10)
    cell.join(10)
    assert not dashboard.is_alive() and not cell.is_alive()
    assert asked == [(1, "pipeline")] and layout.layout == (1, "pipeline")


def test_model_parallel_knobs_describe_a_layout_and_refuse_impossible_ones():
    panel = ControlPanel(RunConfig(strategy="data", world_size=2, model="lm", dataset="sonnets", device="cpu"))
    panel.fields["strategy"].value = "hybrid"
    assert [w.description for w in panel.knob_box.children] == [
        "dp",
        "pp",
        "tp",
        "micro-batches",
        "schedule",
        "compression",  # of the dp dimension
        "PowerSGD rank",
        "top-k ratio",
        "error feedback",
        "checkpoint every (0: off)",
    ]
    knobs = {w.description: w for w in panel.knob_box.children}
    panel.fields["world_size"].value = 4
    knobs["dp"].value, knobs["tp"].value = 2, 2
    assert not panel.run_button.disabled, panel.status.value
    assert (panel.config().dp, panel.config().tp, panel.config().pp) == (2, 2, 1)
    knobs["tp"].value = 3  # 2 x 1 x 3 is not 4 ranks
    assert panel.run_button.disabled and "invalid" in panel.status.value
