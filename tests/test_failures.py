"""Every way a rank can end badly: the run fails (or stops) with a message that
names every rank and the real culprit, keeps what it recorded, and within 10 s
leaves no process and no port behind (checked by the no_leftovers fixture)."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

import ddlkit
from ddlkit import RunConfig, RunFailed


def _failing_run(runs_dir, kind, step=3, **changes):
    cfg = RunConfig(
        strategy="data",
        world_size=2,
        steps=40,
        batch_size=8,
        device="cpu",
        run_dir=runs_dir,
        hang_timeout=60,
        fault={"rank": 1, "step": step, "kind": kind},
    ).replace(**changes)
    run = ddlkit.launch(cfg, echo=False)
    with pytest.raises(RunFailed) as info:
        run.wait(timeout=120)
    return run, str(info.value)


def _assert_recorded_before_failure(run, step, graceful=True):
    """What reached the kernel is kept, in memory and on disk. A rank that
    raises sends everything first; one killed outright loses what it had not
    flushed yet (at most its last 0.1 s)."""
    rows = run.metrics
    steps = rows[rows["rank"] == 1]["step"].tolist()
    assert steps == list(range(step)) if graceful else steps == list(range(len(steps))) and len(steps) <= step
    reloaded = ddlkit.load_run(run.path)
    assert reloaded.status == "failed" and len(reloaded.metrics) == len(rows)


def _ended_within(run, seconds, since):
    assert run.summary["wall_s"] + run.started - since < seconds


def test_exception_names_the_culprit_and_its_traceback(runs_dir):
    run, message = _failing_run(runs_dir, "exception")
    assert run.status == "failed"
    assert "first failure: rank 1" in message
    assert "rank 0:" in message and "rank 1:" in message
    assert "traceback of rank 1:" in message and "RuntimeError: injected fault at step 3" in message
    assert "inject_fault" in message  # the real frame, not a peer's connection error
    _assert_recorded_before_failure(run, 3)
    error_at = next(e["time"] for e in run.events if e["type"] == "error" and e["rank"] == 1)
    _ended_within(run, 10, since=error_at)


def test_os_exit_without_traceback_is_named(runs_dir):
    run, message = _failing_run(runs_dir, "exit")
    assert "first failure: rank 1" in message
    assert "rank 1: exited with code 3 without a traceback" in message
    _assert_recorded_before_failure(run, 3, graceful=False)


def test_sigkill_is_named(runs_dir):
    run, message = _failing_run(runs_dir, "sigkill")
    assert "first failure: rank 1" in message
    assert "rank 1: killed by SIGKILL" in message
    _assert_recorded_before_failure(run, 3, graceful=False)


def test_a_hang_past_the_timeout_fails_with_stacks(runs_dir):
    started = time.time()
    run, message = _failing_run(runs_dir, "hang", hang_timeout=4)
    assert "hung: no step for longer than the hang timeout" in message
    _assert_recorded_before_failure(run, 3)
    last_step_at = max(e["time"] for e in run.events if e["type"] == "step")
    _ended_within(run, 4 + 10, since=last_step_at)
    assert time.time() - started < 60
    # faulthandler's stack dump of the hung rank reached its log
    assert "inject_fault" in (run.path / "rank1.log").read_text()


def _victim_function():
    import torch
    import torch.distributed as dist
    from accelerate import Accelerator

    accelerator = Accelerator()
    ddlkit.log(step=0, loss=1.0)
    if accelerator.process_index == 1:
        time.sleep(0.5)
        raise ValueError("bad batch on rank 1")
    dist.all_reduce(torch.ones(1))  # rank 0 waits here for a peer that never comes


def test_the_victim_of_a_reset_connection_is_not_blamed(runs_dir):
    run = ddlkit.launch(_victim_function, num_processes=2, run_dir=runs_dir, echo=False)
    with pytest.raises(RunFailed) as info:
        run.wait(timeout=60)
    message = str(info.value)
    assert "first failure: rank 1" in message
    assert "ValueError: bad batch on rank 1" in message
    assert "rank 0:" in message


def _long_function():
    for step in range(100_000):
        ddlkit.log(step=step, loss=1.0)
        time.sleep(0.01)


def test_stop_ends_the_run_as_stopped_keeping_its_rows(runs_dir):
    run = ddlkit.launch(_long_function, num_processes=2, run_dir=runs_dir, echo=False)
    while len(run.metrics) < 40:  # 20 rows of each rank (steps_done follows the faster one: 39 were seen)
        time.sleep(0.05)
    run.stop()
    assert run.status == "stopped"
    kept = len(run.metrics)
    assert kept >= 40  # nothing received before the stop is dropped
    assert len(ddlkit.load_run(run.path).metrics) == kept
    with pytest.raises(RuntimeError, match="stopped before it finished"):
        run.result()


def test_an_interrupt_during_wait_stops_the_run_never_done(runs_dir):
    run = ddlkit.launch(_long_function, num_processes=2, run_dir=runs_dir, echo=False)
    # Jupyter's interrupt is SIGINT to the kernel's whole process group: the
    # workers lead groups of their own from the moment launch() returns, so it
    # never reaches them...
    assert all(os.getpgid(pid) == pid != os.getpgid(0) for pid in run.pids)
    # ... and in the kernel it arrives during wait().
    threading.Timer(1.0, os.kill, args=(os.getpid(), signal.SIGINT)).start()
    started = time.time()
    with pytest.raises(KeyboardInterrupt):
        run.wait(timeout=60)
    assert time.time() - started < 10
    assert run.status == "stopped"
    assert ddlkit.load_run(run.path).status == "stopped"


def _finish_then_abort():
    import torch
    import torch.distributed as dist
    from accelerate import Accelerator

    accelerator = Accelerator()
    dist.all_reduce(torch.ones(1))
    ddlkit.log(step=0, loss=0.5)
    # What DDP on gloo sometimes does in interpreter shutdown after a clean
    # finish: abort. Here it happens on every exit of this worker.
    os._exit = lambda code: os.abort()
    return accelerator.process_index


def test_an_abort_after_finishing_is_not_a_failure(runs_dir):
    run = ddlkit.launch(_finish_then_abort, num_processes=2, run_dir=runs_dir, echo=False).wait(timeout=60)
    assert run.status == "done"
    assert run.result().returns == {0: 0, 1: 1}


def _quits_early():
    import torch
    import torch.distributed as dist
    from accelerate import Accelerator

    accelerator = Accelerator()
    if accelerator.process_index == 1:
        os._exit(0)  # exit code 0, but its work is not done
    dist.all_reduce(torch.ones(1))


def test_a_rank_that_exits_0_before_finishing_fails_the_run(runs_dir):
    run = ddlkit.launch(_quits_early, num_processes=2, run_dir=runs_dir, echo=False)
    with pytest.raises(RunFailed, match="rank 1: exited with code 0 without a traceback"):
        run.wait(timeout=60)


def test_a_ranks_traceback_is_shown_once_and_kept_in_its_log(runs_dir):
    cfg = RunConfig(
        world_size=2,
        steps=40,
        batch_size=8,
        device="cpu",
        run_dir=runs_dir,
        fault={"rank": 1, "step": 3, "kind": "exception"},
    )
    echoed: list[str] = []
    run = ddlkit.launch(cfg, echo=echoed.append)
    with pytest.raises(RunFailed) as info:
        run.wait(timeout=120)
    assert str(info.value).count('raise RuntimeError(f"injected fault at step {step}")') == 1  # the traceback, once
    assert not any("injected fault" in line or line.endswith("Traceback (most recent call last):") for line in echoed)
    assert "RuntimeError: injected fault at step 3" in (run.path / "rank1.log").read_text()  # the log keeps it


def test_an_interrupt_during_wait_stops_the_run_and_says_so_in_one_line(runs_dir):
    run = ddlkit.launch(RunConfig(steps=100_000, batch_size=8, device="cpu", run_dir=runs_dir), echo=False)
    main = threading.main_thread().ident

    def interrupt():  # Ctrl-C, or Jupyter's stop button, while the notebook waits
        while run.steps_done < 5:
            time.sleep(0.05)
        time.sleep(0.3)
        signal.pthread_kill(main, signal.SIGINT)

    threading.Thread(target=interrupt, daemon=True).start()
    with pytest.raises(ddlkit.RunInterrupted) as info:
        run.wait(timeout=120)
    assert run.status == "stopped" and run.steps_done >= 5
    shown = info.value._render_traceback_()  # what IPython prints instead of a traceback
    assert len(shown) == 1 and f"run {run.id} was stopped by the interrupt" in shown[0]
    assert info.value.__suppress_context__  # no chained traceback through threading.py
    assert len(ddlkit.load_run(run.path).metrics) == len(run.metrics)  # everything recorded stayed


# ---- which rank hangs ------------------------------------------------------------
class _Process:
    """Stands in for a worker process (only its pid is read)."""

    def __init__(self, pid: int):
        self.pid = pid

    def poll(self):
        return None


def _stalled(rank, last_progress, waiting, now=100.0, pid=None, started=True):
    from ddlkit.kernel.ranks import RankState

    return RankState(
        rank,
        _Process(pid or os.getpid()),
        started=started,
        last_step=5 if started else -1,
        progress_at=now - last_progress,
        heard_at=now - 0.5,
        waiting=waiting,
    )


def test_the_rank_its_peers_wait_for_is_the_hung_one_not_the_first_overdue():
    from ddlkit.kernel.hangs import hung_ranks

    # rank 0 logged its last step a moment before rank 1 did, so it is overdue
    # first; but it waits in a collective, and rank 1 does not.
    ranks = [_stalled(0, 2.1, waiting=True), _stalled(1, 1.9, waiting=False)]
    assert hung_ranks(ranks, 100.0, hang_timeout=2.0) == [ranks[1]]
    assert [r.hung for r in ranks] == [False, True]
    # all waiting on one another (a real distributed deadlock): the overdue one
    ranks = [_stalled(0, 2.1, waiting=True), _stalled(1, 1.9, waiting=True)]
    assert hung_ranks(ranks, 100.0, hang_timeout=2.0) == [ranks[0]]
    # nothing overdue yet, and a rank still starting up gets its grace
    assert hung_ranks([_stalled(0, 1.9, waiting=False)], 100.0, hang_timeout=2.0) == []
    assert hung_ranks([_stalled(0, 30.0, waiting=False, started=False)], 100.0, hang_timeout=2.0) == []


def test_a_stopped_rank_is_the_hung_one_and_said_to_be_stopped():
    import subprocess

    from ddlkit.kernel.hangs import hung_ranks

    stopped = subprocess.Popen(["sleep", "60"])
    try:
        os.kill(stopped.pid, signal.SIGSTOP)
        time.sleep(0.2)
        ranks = [_stalled(0, 2.1, waiting=False), _stalled(1, 1.5, waiting=False, pid=stopped.pid)]
        assert hung_ranks(ranks, 100.0, hang_timeout=2.0) == [ranks[1]]
        assert "stopped by a signal (SIGSTOP" in ranks[1].describe()
    finally:
        stopped.kill()
        stopped.wait()


def test_ranks_ddlkit_killed_are_never_the_culprit():
    from ddlkit.kernel.ranks import culprit, failure_report

    waiting, hung = _stalled(0, 3.0, waiting=True), _stalled(1, 2.0, waiting=False)
    hung.hung = True
    for state in (waiting, hung):
        state.ended_by_ddlkit, state.returncode, state.ended_at = True, -signal.SIGKILL, 101.0
    waiting.ended_at = 100.5  # it died first, but by ddlkit's hand
    assert culprit([waiting, hung]) is hung
    report = failure_report("r", [waiting, hung])
    assert "first failure: rank 1" in report
    assert "rank 0: waiting for a peer, killed by ddlkit when the run ended" in report
    assert "killed by SIGKILL" not in report
