"""Checkpoints, resume, elastic restarts and live resizing. Each test that
trains compares its final weights with an uninterrupted run of the same config:
whatever failed or changed on the way, the run must end where it would have.
Steps redone are counted from the events (``run.events`` keeps every attempt's
step events; ``run.metrics`` only the latest per step)."""

from __future__ import annotations

import json
import re
import shutil
import time

import pytest
import torch

import ddlkit
from ddlkit import RunConfig, checkpoint
from ddlkit.cli import main as cli_main

BASE = RunConfig(
    strategy="data",
    world_size=2,
    steps=30,
    batch_size=8,
    lr=0.01,
    optimizer="adam",
    device="cpu",
    hang_timeout=60,
    checkpoint_every=5,
    keep_checkpoints=3,
)
_references: dict[str, dict[str, torch.Tensor]] = {}


def reference_state(cfg: RunConfig) -> dict[str, torch.Tensor]:
    """Final weights of the same experiment run straight through (cached per config)."""
    clean = cfg.replace(fault=None, max_restarts=0, checkpoint_every=None)
    key = json.dumps({**clean.to_dict(), "run_dir": None}, sort_keys=True)  # the same experiment, any folder
    if key not in _references:
        _references[key] = ddlkit.launch(clean, echo=False).wait(timeout=180).result().state_dict
    return _references[key]


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def of_type(run, kind):
    return [e for e in run.events if e["type"] == kind]


def steps_redone(run) -> int:
    """Step events of rank 0 for a step that an earlier attempt had already logged."""
    logged = [e["step"] for e in run.events if e["type"] == "step" and e["rank"] == 0]
    return len(logged) - len(set(logged))


def assert_one_row_per_step(run, steps):
    """Rank 0 (which never died abruptly here) has every step once; no rank has a step twice."""
    rows = run.metrics
    assert not rows.duplicated(["rank", "step"]).any()
    assert sorted(rows.query("rank == 0")["step"]) == list(range(steps))


# ---- the checkpoint files -------------------------------------------------
def test_checkpoints_are_whole_or_skipped_and_only_the_last_k_kept(tmp_path):
    for step in (5, 10, 15, 20):
        checkpoint.save(tmp_path, step, {"state.pt": {"w": torch.full((100,), float(step))}}, meta={}, keep=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000010", "step-000015", "step-000020"]
    (tmp_path / "step-000025.tmp").mkdir()  # a writer killed before its manifest and rename
    assert checkpoint.latest(tmp_path).step == 20

    newest = tmp_path / "step-000020" / "state.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated on disk
    same_size = tmp_path / "step-000015" / "state.pt"
    shutil.copy(tmp_path / "step-000010" / "state.pt", same_size)  # whole, loadable, but not what was written
    found = checkpoint.latest(tmp_path)
    assert found.step == 10
    assert "step-000020" in found.skipped[0] and "truncated" in found.skipped[0]
    assert "step-000015" in found.skipped[1] and "sha256" in found.skipped[1]
    assert checkpoint.load_file(found.path / "state.pt")["w"][0].item() == 10.0


def test_checkpoints_past_step_999999_sort_by_number(tmp_path):
    for step in (999_980, 999_990, 1_000_000, 1_000_010):
        checkpoint.save(tmp_path, step, {"state.pt": {"w": torch.full((4,), float(step))}}, meta={}, keep=2)
    # "step-1000010" < "step-999990" as strings: the newest must still win, and pruning keep it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-1000000", "step-1000010"]
    found = checkpoint.latest(tmp_path)
    assert found.step == 1_000_010
    assert checkpoint.load_file(found.path / "state.pt")["w"][0].item() == 1_000_010.0


def test_a_checkpoint_that_cannot_be_written_leaves_no_tmp_folder(tmp_path, monkeypatch):
    import errno

    def disk_full(path, write):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(checkpoint, "write_synced", disk_full)
    with pytest.raises(OSError, match="No space left"):
        checkpoint.save(tmp_path, 5, {"state.pt": {"w": torch.ones(2)}}, meta={})
    assert list(tmp_path.iterdir()) == []


# ---- elastic restart ------------------------------------------------------
def test_kill_9_restarts_all_ranks_and_redoes_at_most_c_steps(runs_dir):
    cfg = BASE.replace(run_dir=runs_dir, max_restarts=1, fault={"rank": 1, "step": 13, "kind": "sigkill"})
    run = ddlkit.launch(cfg, echo=False).wait(timeout=240)
    assert run.status == "done"
    (restart,) = of_type(run, "restart")
    assert restart["attempt"] == 1 and "rank 1: killed by SIGKILL" in restart["reason"]
    assert restart["from_step"] == 10  # the newest checkpoint before the kill
    assert steps_redone(run) <= cfg.checkpoint_every
    assert_one_row_per_step(run, cfg.steps)
    assert len(run.pids) == 4  # two attempts of two ranks, all checked gone by the fixture
    assert max_difference(run.result().state_dict, reference_state(cfg)) < 1e-6


def test_rows_of_a_killed_rank_are_never_lost_behind_a_checkpoint(runs_dir):
    """Rank 1 is killed as it starts step 10, just after checkpoint 10: the rows
    it logged in its last 0.1 s must not be lost (its reporter sends in batches)
    while the restart resumes after them. Every rank has every step, once."""
    cfg = BASE.replace(run_dir=runs_dir, steps=15, max_restarts=1, fault={"rank": 1, "step": 10, "kind": "sigkill"})
    run = ddlkit.launch(cfg, echo=False).wait(timeout=240)
    assert run.status == "done"
    rows = run.metrics
    for rank in (0, 1):
        assert sorted(rows.query(f"rank == {rank}")["step"]) == list(range(cfg.steps)), f"rank {rank}"
    assert max_difference(run.result().state_dict, reference_state(cfg)) < 1e-6


def test_a_restart_resumes_no_later_than_the_rows_that_arrived(tmp_path):
    """Should rows be lost anyway (a rank killed between its last step and the
    checkpoint its peers finish), the kernel restarts from an older checkpoint."""
    from ddlkit.kernel.ranks import RankState
    from ddlkit.kernel.restarts import Restarts
    from ddlkit.kernel.run import Run

    for step in (5, 10):
        checkpoint.save(checkpoint.folder_of(tmp_path), step, {"state.pt": {"w": torch.ones(1)}}, meta={}, keep=3)
    rows = [{"type": "step", "rank": r, "step": s, "time": 1.0} for r in (0, 1) for s in range(12) if (r, s) != (1, 8)]
    run = Run.from_events(rows, path=tmp_path, status="running")
    ranks = [RankState(0, None, returncode=-9), RankState(1, None, returncode=-9)]  # type: ignore[arg-type]
    attempt = Restarts(run, BASE.replace(max_restarts=1)).next(ranks)
    assert attempt.event["from_step"] == 5  # not 10: rank 1's row of step 8 never arrived, so step 8 is redone
    assert "step-000010 is not used: the rows of step 8 never arrived" in attempt.event["skipped"][0]


def test_restarts_are_reliable_20_of_20(runs_dir):
    # Attempt i resumes at step 2i, checkpoints step 2i+2 and loses a rank there:
    # 20 faults (SIGKILL, exception, os._exit on either rank), 20 restarts.
    kinds = ("sigkill", "exception", "exit")
    faults = [{"rank": i % 2, "step": 2 * i + 2, "kind": kinds[i % 3], "attempt": i} for i in range(20)]
    cfg = BASE.replace(run_dir=runs_dir, steps=44, checkpoint_every=2, max_restarts=20, fault=faults)
    run = ddlkit.launch(cfg, echo=False).wait(timeout=600)
    assert run.status == "done"
    restarts = of_type(run, "restart")
    assert [r["attempt"] for r in restarts] == list(range(1, 21))
    assert all(r["from_step"] >= 2 * i for i, r in enumerate(restarts))
    assert steps_redone(run) <= 20 * cfg.checkpoint_every
    assert_one_row_per_step(run, cfg.steps)
    assert max_difference(run.result().state_dict, reference_state(cfg)) < 1e-6


def test_a_hang_past_the_timeout_restarts_too(runs_dir):
    cfg = BASE.replace(
        run_dir=runs_dir, steps=15, hang_timeout=5, max_restarts=1, fault={"rank": 1, "step": 8, "kind": "hang"}
    )
    run = ddlkit.launch(cfg, echo=False).wait(timeout=240)
    assert run.status == "done"
    (restart,) = of_type(run, "restart")
    assert "hung" in restart["reason"] and restart["from_step"] == 5
    assert_one_row_per_step(run, cfg.steps)


def test_without_restarts_left_the_run_fails(runs_dir):
    faults = [{"rank": 1, "step": 3, "kind": "exception", "attempt": a} for a in (0, 1)]
    cfg = BASE.replace(run_dir=runs_dir, steps=10, max_restarts=1, fault=faults)
    with pytest.raises(ddlkit.RunFailed, match="injected fault at step 3"):
        ddlkit.launch(cfg, echo=False).wait(timeout=180)


# ---- resume -----------------------------------------------------------------
def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_run(runs_dir):
    cfg = BASE.replace(run_dir=runs_dir, fault={"rank": 0, "step": 17, "kind": "exception"})
    failed = ddlkit.launch(cfg, echo=False)
    with pytest.raises(ddlkit.RunFailed):
        failed.wait(timeout=180)
    said = []
    resumed = ddlkit.launch(resume=failed.path, echo=said.append).wait(timeout=180)
    assert resumed.id == failed.id and resumed.path == failed.path and resumed.status == "done"
    assert any("resuming run" in line and "step-000015" in line for line in said)
    (restart,) = of_type(resumed, "restart")
    assert restart["reason"] == "resume" and restart["from_step"] == 15
    # One run, one curve: old and new events in the same log, one row per (rank, step).
    assert_one_row_per_step(resumed, cfg.steps)
    assert resumed.events[0]["attempt"] == 0 and resumed.events[-1]["attempt"] == 1
    reloaded = ddlkit.load_run(resumed.path)
    assert reloaded.status == "done" and len(reloaded.metrics) == len(resumed.metrics)
    assert max_difference(resumed.result().state_dict, reference_state(cfg)) < 1e-6


def test_a_corrupt_checkpoint_is_never_loaded_resume_says_so(runs_dir):
    cfg = BASE.replace(strategy="single", world_size=1, steps=20, run_dir=runs_dir)
    first = ddlkit.launch(cfg, echo=False).wait(timeout=180)
    folder = checkpoint.folder_of(first.path)
    assert sorted(p.name for p in folder.iterdir()) == ["step-000005", "step-000010", "step-000015"]
    newest = folder / "step-000015" / "state.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated
    # Loadable but wrong: step 5's state under step 10's name. Loading it would
    # end far from the reference weights.
    shutil.copy(folder / "step-000005" / "state.pt", folder / "step-000010" / "state.pt")
    said = []
    longer = cfg.replace(steps=25)
    resumed = ddlkit.launch(longer, resume=first.path, echo=said.append).wait(timeout=180)
    assert any("step-000015 is invalid" in line and "truncated" in line for line in said)
    assert any("step-000010 is invalid" in line for line in said)
    assert of_type(resumed, "restart")[0]["from_step"] == 5
    assert max_difference(resumed.result().state_dict, reference_state(longer)) < 1e-6


def test_cli_resume_continues_the_same_folder(runs_dir, capsys):
    cfg = BASE.replace(strategy="single", world_size=1, steps=10, run_dir=runs_dir)
    first = ddlkit.launch(cfg, echo=False).wait(timeout=180)
    assert cli_main(["run", "--resume", str(first.path), "--steps", "14"]) == 0
    again = ddlkit.load_run(first.path)
    assert again.status == "done" and sorted(again.metrics["step"]) == list(range(14))
    assert of_type(again, "restart")[0]["from_step"] == 5


# ---- live resize ------------------------------------------------------------
def _wait_for(condition, timeout=120.0):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out waiting"
        time.sleep(0.05)


def test_resize_2_to_1_and_back_loses_no_step(runs_dir):
    cfg = BASE.replace(run_dir=runs_dir, steps=50, checkpoint_every=10)
    run = ddlkit.launch(cfg, echo=False)
    run.control(slowdown={0: 10.0, 1: 10.0})  # slow enough to resize mid-run
    with pytest.raises(ValueError, match="must split evenly"):
        run.relaunch(world_size=3)  # 16 samples do not split over 3 ranks
    _wait_for(lambda: run.steps_done >= 8)
    run.relaunch(world_size=1)
    _wait_for(lambda: len(of_type(run, "layout")) == 1)
    resumed_at = of_type(run, "layout")[0]["from_step"]
    _wait_for(lambda: run.steps_done >= resumed_at + 8)
    run.relaunch(world_size=2)
    run.wait(timeout=300)
    assert run.status == "done" and run.world_size == 2
    layouts = of_type(run, "layout")
    assert [(e["world_size"], e["batch_size"]) for e in layouts] == [(1, 16), (2, 8)]  # same global batch
    for layout in layouts:  # the ranks stopped at a step and checkpointed it: nothing lost, nothing redone
        before = [
            e["step"]
            for e in run.events
            if e["type"] == "step" and e["rank"] == 0 and e["attempt"] == layout["attempt"] - 1
        ]
        assert layout["from_step"] == max(before) + 1
    assert steps_redone(run) == 0
    assert_one_row_per_step(run, cfg.steps)
    # The slowdown asked at the start is in force in every attempt, but marked once: when first applied.
    assert [e["attempt"] for e in of_type(run, "control") if "slowdown" in e] == [0]
    # Two ranks of 8 and one of 16 take the same steps (data parallelism is
    # large-batch training): the weights match the 2-rank run up to rounding.
    assert max_difference(run.result().state_dict, reference_state(cfg)) < 1e-5


LAYOUTS = [("pipeline", 2), ("tensor", 2), ("fsdp", 2), ("data", 1)]


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_a_run_without_checkpoints_goes_through_every_layout_from_the_same_weights(runs_dir, optimizer):
    """data(2) -> pipeline(2) -> tensor(2) -> fsdp(2) -> data(1), live, on one run
    launched without checkpoint_every: each stop saves the step whole, by
    single-process names (model and optimizer state), and the next layout loads
    it. The run ends with the weights of an uninterrupted data(2) run: with SGD,
    and with Adam, whose moments must carry over for that."""
    cfg = RunConfig(
        strategy="data",
        world_size=2,
        steps=40,
        batch_size=8,
        lr=0.05 if optimizer == "sgd" else 0.01,
        optimizer=optimizer,
        hidden=32,
        device="cpu",
        hang_timeout=60,
        run_dir=runs_dir,
        delay_s={0: 0.1, 1: 0.1},  # slow enough to change layout every few steps
    )
    run = ddlkit.launch(cfg, echo=False)
    _wait_for(lambda: run.steps_done >= 4)
    for count, (strategy, world_size) in enumerate(LAYOUTS, start=1):
        run.relaunch(world_size=world_size, strategy=strategy)
        _wait_for(lambda count=count: len(of_type(run, "layout")) == count)
        resumed_at = of_type(run, "layout")[-1]["from_step"]
        _wait_for(lambda resumed_at=resumed_at: run.steps_done >= resumed_at + 3 or not run.live)
    run.wait(timeout=300)
    assert run.status == "done" and (run.strategy, run.world_size) == ("data", 1)
    layouts = of_type(run, "layout")
    # The same global batch of 16 samples: one replica of 16, or two of 8.
    assert [(e["strategy"], e["world_size"], e["batch_size"]) for e in layouts] == [
        ("pipeline", 2, 16),
        ("tensor", 2, 16),
        ("fsdp", 2, 8),
        ("data", 1, 16),
    ]
    for layout in layouts:  # each layout went on exactly after the last step of the one before
        before = [e["step"] for e in of_type(run, "step") if e["rank"] == 0 and e["attempt"] == layout["attempt"] - 1]
        assert layout["from_step"] == max(before) + 1 and layout["checkpoint"] == f"step-{layout['from_step']:06d}"
    assert steps_redone(run) == 0
    assert_one_row_per_step(run, cfg.steps)
    assert max_difference(run.result().state_dict, reference_state(cfg.replace(delay_s=None))) < 1e-5


def test_a_relaunch_that_cannot_work_is_refused_before_anything_stops(runs_dir):
    run = ddlkit.launch(BASE.replace(run_dir=runs_dir, steps=10_000, checkpoint_every=None), echo=False)
    _wait_for(lambda: run.steps_done >= 2)
    for changes, message in [
        ({"strategy": "ps", "world_size": 3}, "strategy='ps' is invalid for a relaunch"),
        ({"strategy": "pipeline", "world_size": 1}, "world_size=1 is invalid for strategy='pipeline'"),
        ({"world_size": 3}, "must split evenly over 3"),
        ({"strategy": "pipeline", "micro_batches": 3}, "micro_batches=3 is invalid"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            run.relaunch(**changes)
    assert run.status == "running" and of_type(run, "control_request") == []  # nothing was asked of the ranks
    run.stop()
    ps = ddlkit.launch(RunConfig(strategy="ps", world_size=3, steps=10_000, device="cpu", run_dir=runs_dir), echo=False)
    with pytest.raises(ValueError, match="a run of strategy='ps' cannot change its layout live"):
        ps.relaunch(world_size=2)
    ps.stop()


# ---- refused before anything starts -----------------------------------------
@pytest.mark.parametrize(
    "changes, message",
    [
        ({"checkpoint_every": 0}, "checkpoint_every=0 is invalid"),
        ({"keep_checkpoints": 0}, "keep_checkpoints=0 is invalid"),
        ({"max_restarts": -1}, "max_restarts=-1 is invalid"),
        (
            {"fault": {"rank": 0, "step": 1, "kind": "exit", "attempt": 2}, "max_restarts": 1},
            "fault attempt=2 is invalid",
        ),
        ({"fault": [{"rank": 0, "step": 1, "kind": "exit"}, {"rank": 5, "step": 1, "kind": "exit"}]}, "fault rank=5"),
        ({"strategy": "ps", "world_size": 3}, "checkpoint_every=5 is invalid for strategy='ps'"),
    ],
)
def test_bad_fault_tolerance_configs_are_refused(runs_dir, changes, message):
    with pytest.raises(ValueError, match=message):
        ddlkit.launch(BASE.replace(run_dir=runs_dir, **changes), echo=False)


def test_resume_without_a_valid_checkpoint_is_refused(runs_dir, tmp_path):
    with pytest.raises(ValueError, match="not the folder of a built-in run"):
        ddlkit.launch(resume=tmp_path / "nothing", echo=False)
    folder = tmp_path / "runs" / "old"
    (folder / "checkpoints" / "step-000005.tmp").mkdir(parents=True)  # never finished
    (folder / "run.json").write_text("{}")
    BASE.replace(run_dir=runs_dir).save(folder / "config.json")
    with pytest.raises(ValueError, match="has no valid checkpoint"):
        ddlkit.launch(resume=folder, echo=False)
    assert cli_main(["run", "--resume", str(folder)]) == 2
