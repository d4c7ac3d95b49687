"""Live controls reach every rank within 1 s, at the same step on every rank."""

from __future__ import annotations

import time

import pytest

import ddlkit
from ddlkit import RunConfig


def _endless(runs_dir, **changes):
    cfg = RunConfig(
        strategy="data", world_size=2, steps=1_000_000, batch_size=16, device="cpu", run_dir=runs_dir, hang_timeout=60
    ).replace(**changes)
    run = ddlkit.launch(cfg, echo=False)
    _wait_until(lambda: run.steps_done >= 30, 60)
    return run


def _wait_until(condition, timeout):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_an_lr_change_reaches_every_rank_within_a_second_at_the_same_step(runs_dir):
    run = _endless(runs_dir)
    asked = time.time()
    run.set_lr(0.0123)

    def applied():
        rows = run.metrics
        return set(rows[rows["lr"] == 0.0123]["rank"]) == {0, 1}

    _wait_until(applied, 5)
    assert time.time() - asked < 1.0
    rows = run.metrics
    first = rows[rows["lr"] == 0.0123].groupby("rank")["step"].min()
    assert first[0] == first[1]  # replicas stay identical only if both switch together
    assert (rows[rows["step"] < first[0]]["lr"] == 0.05).all()
    (marker,) = [e for e in run.events if e["type"] == "control"]
    assert marker["lr"] == 0.0123 and marker["step"] == first[0]
    run.stop()
    assert run.status == "stopped"


def test_pause_holds_the_steps_and_resume_goes_on_without_a_hang_alarm(runs_dir):
    run = _endless(runs_dir, hang_timeout=2)
    run.pause()
    time.sleep(0.5)
    held = run.steps_done
    time.sleep(3)  # longer than the hang timeout
    assert run.steps_done == held
    assert run.status == "running"
    run.resume()
    _wait_until(lambda: run.steps_done > held + 10, 5)
    run.stop()
    assert run.status == "stopped"


def test_stop_ends_the_ranks_together_at_a_step(runs_dir):
    run = _endless(runs_dir)
    asked = time.time()
    run.stop()
    assert time.time() - asked < 1.0
    assert run.status == "stopped"
    finished = [e for e in run.events if e["type"] == "finished"]
    assert len(finished) == 2 and all(e["stopped"] for e in finished)  # they stopped, nobody killed them
    assert len({e["steps"] for e in finished}) == 1


def test_a_slowed_rank_slows_the_synchronous_run(runs_dir):
    # a slowdown scales a data-parallel rank's compute (batch, forward, backward; not the all-reduce):
    # give it compute to scale, and a factor that doubles the step even where compute is half of it
    run = _endless(runs_dir, batch_size=512, hidden=256)
    _wait_until(lambda: run.steps_done >= 200, 30)
    before = run.metrics["step_time"].median()
    run.control(slowdown={1: 8.0})
    marker_step = None
    while marker_step is None:
        marker_step = next((e["step"] for e in run.events if e["type"] == "control"), None)
        time.sleep(0.01)
    _wait_until(lambda: run.steps_done >= marker_step + 100, 60)
    rows = run.metrics
    after = rows[rows["step"] > marker_step]["step_time"].median()
    run.stop()
    assert after > 2 * before  # everyone waits for the straggler at the all-reduce


def test_bad_controls_are_refused_with_what_is_valid(runs_dir):
    run = _endless(runs_dir)
    with pytest.raises(ValueError, match="control 'momentum' is unknown: valid controls are"):
        run.control(momentum=0.9)
    with pytest.raises(ValueError, match="control lr=-1 is invalid: it must be a positive number"):
        run.control(lr=-1)
    with pytest.raises(ValueError, match="slowdown rank 7 is invalid: valid ranks are 0..1"):
        run.control(slowdown={7: 2.0})
    run.stop()
    with pytest.raises(RuntimeError, match="is stopped: there is nothing to control"):
        run.set_lr(0.1)


def _sleepy():
    time.sleep(30)


def test_controls_are_for_built_in_experiments(runs_dir):
    run = ddlkit.launch(_sleepy, num_processes=1, run_dir=runs_dir, echo=False)
    with pytest.raises(RuntimeError, match="not on a launched function"):
        run.set_lr(0.1)
    run.stop()
