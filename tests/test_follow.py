"""ddlkit.follow: a live, read-only Run over a folder that ranks of another
launcher are writing (files growing, appearing late, lines cut mid-write)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

import ddlkit
from ddlkit.controls import CONTROL_FILE
from ddlkit.kernel.follow import RankLogs
from ddlkit.rank.elastic import read_control_file


def line(rank: int, kind: str, t: float, **fields) -> bytes:
    return (json.dumps({"rank": rank, "time": t, "type": kind, **fields}) + "\n").encode()


def step(rank: int, s: int, t0: float = 1000.0) -> bytes:
    return line(rank, "step", t0 + s + rank / 10, step=s, loss=2.0 - s / 10)


def append(folder: Path, rank: int, data: bytes) -> None:
    with open(folder / f"events-rank{rank}.jsonl", "ab") as f:
        f.write(data)


def until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.fixture
def folder(tmp_path):
    folder = tmp_path / "runs" / "job-1"
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"id": "job-1", "started": 1000.0, "world_size": 2}))
    return folder


def test_rank_logs_read_every_complete_line_once_whatever_the_cuts(folder):
    """Lines cut at every byte, a file that appears late, a torn line: every
    event is read exactly once, in time order, and nothing raises."""
    logs = RankLogs(folder)
    assert logs.read() == []
    text = b"".join(step(0, s) for s in range(5))
    got = []
    for i in range(len(text)):  # one byte at a time: every cut point is a partial last line
        append(folder, 0, text[i : i + 1])
        got += logs.read()
    assert [e["step"] for e in got] == [0, 1, 2, 3, 4]
    append(folder, 1, step(1, 0) + step(1, 1))  # rank 1's file appears late
    append(folder, 0, step(0, 5))
    got = logs.read()
    assert [(e["rank"], e["step"]) for e in got] == [(1, 0), (1, 1), (0, 5)]  # time order across files
    append(folder, 1, b'{"rank": 1, "time": 10')  # killed mid-write...
    assert logs.read() == []
    append(folder, 1, b"\n" + step(1, 2))  # ...and the restarted rank ended the line first
    assert [e["step"] for e in logs.read()] == [2]
    assert logs.skipped_lines == 1
    assert logs.read() == []


def test_follow_is_live_and_never_double_counts(folder):
    run = ddlkit.follow(folder, poll_s=0.02)
    assert run.status == "starting" and run.world_size == 2
    written = []
    for s in range(4):
        for rank in (0, 1):
            data = step(rank, s)
            append(folder, rank, data[:7])  # a partial line, seen by some polls
            time.sleep(0.01)
            append(folder, rank, data[7:])
            written.append((rank, s))
    until(lambda: len(run.metrics) == 8)
    assert run.status == "running"
    time.sleep(0.1)  # more polls: nothing read twice
    assert sorted(zip(run.metrics["rank"], run.metrics["step"], strict=True)) == sorted(written)
    append(folder, 0, line(0, "beat", 1010.0, step=3) + line(0, "finished", 1010.0, steps=4))
    time.sleep(0.1)
    assert run.live, "done only when every rank finished"
    append(folder, 1, line(1, "finished", 1010.5, steps=4))
    assert run.wait(10).status == "done"
    assert len(run.metrics) == 8 and [e["type"] for e in run.events].count("finished") == 2
    assert "beat" not in {e["type"] for e in run.events}
    assert run.summary["steps"] == 4 and run.metrics["time"].min() == pytest.approx(0.0)
    assert ddlkit.load_run(folder).metrics.equals(run.metrics)  # the same table read afterwards


def test_an_error_fails_a_followed_run_unless_the_launcher_restarts_it(folder):
    run = ddlkit.follow(folder, poll_s=0.02)
    for s in range(3):
        append(folder, 0, step(0, s))
        append(folder, 1, step(1, s))
    append(folder, 0, line(0, "error", 1004.0, traceback="gloo: Connection reset by peer", restarting=True))
    until(lambda: len(run.metrics) == 6)
    time.sleep(0.1)
    assert run.status == "running"  # torchrun will start the ranks again
    append(
        folder, 0, line(0, "restart", 1005.0, attempt=1, reason="restarted", from_step=2, checkpoint=None, skipped=[])
    )
    append(folder, 0, step(0, 2, t0=1004.0) + line(0, "finished", 1007.0))
    append(folder, 1, step(1, 2, t0=1004.0))
    until(lambda: any(e["type"] == "restart" for e in run.events))
    assert sorted(run.metrics["step"]) == [0, 0, 1, 1, 2, 2]  # the redone step counted once
    append(folder, 1, line(1, "error", 1008.0, traceback="RuntimeError: boom"))  # no restart left
    with pytest.raises(ddlkit.RunFailed, match="rank 1 failed:\nRuntimeError: boom"):
        run.wait(10)
    assert run.status == "failed" and ddlkit.load_run(folder).status == "failed"


def test_a_run_whose_ranks_went_silent_fails(folder):
    run = ddlkit.follow(folder, poll_s=0.02, silent_s=0.3)
    append(folder, 0, step(0, 0))
    with pytest.raises(ddlkit.RunFailed, match="no rank of run job-1 wrote anything for 0.3 s"):
        run.wait(10)


def test_follow_refuses_what_it_cannot_follow(tmp_path, folder):
    with pytest.raises(FileNotFoundError, match="is not a run folder"):
        ddlkit.follow(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="must be positive"):
        ddlkit.follow(folder, poll_s=0)
    (tmp_path / "launched").mkdir()
    (tmp_path / "launched" / "events.jsonl").write_text("")
    with pytest.raises(ValueError, match="written by ddlkit.launch"):
        ddlkit.follow(tmp_path / "launched")


def test_steering_a_followed_run_writes_a_private_control_file(folder):
    ddlkit.RunConfig(world_size=2, device="cpu").save(folder / "config.json")
    run = ddlkit.follow(folder, poll_s=0.02, silent_s=5)
    run.set_lr(0.01)
    run.pause()
    control = folder / CONTROL_FILE
    assert read_control_file(control) == {"sequence": 2, "lr": 0.01, "paused": True}
    assert oct(control.stat().st_mode & 0o777) == "0o600" and not list(folder.glob("*.tmp"))
    with pytest.raises(ValueError, match="control lr=-1 is invalid"):
        run.set_lr(-1)
    with pytest.raises(RuntimeError, match="started by another launcher"):
        run.relaunch(world_size=1)
    assert read_control_file(control)["sequence"] == 2  # a refused change writes nothing
    os.chmod(control, 0o666)  # writable by others: not to be trusted
    assert read_control_file(control) is None
    os.chmod(control, 0o600)
    run.stop(timeout=0.1)  # asks the ranks to stop; the run ends when they say they did
    assert read_control_file(control)["stop"] is True and run.live
    for rank in (0, 1):
        append(folder, rank, line(rank, "finished", 1003.0, stopped=True))
    assert run.wait(10).status == "stopped"


def test_a_dashboard_of_a_followed_run_draws_live(folder):
    run = ddlkit.follow(folder, poll_s=0.02)
    dashboard = ddlkit.Dashboard(run, interval=0.05)
    assert dashboard.running

    def drawn() -> int:
        mean = [t for t in dashboard.figure.data if t.name == "mean loss"]
        return len(mean[0].x) if mean else 0

    for s in range(3):
        append(folder, 0, step(0, s))
        append(folder, 1, step(1, s))
        until(lambda s=s: drawn() == s + 1)
    for rank in (0, 1):
        append(folder, rank, line(rank, "finished", 1004.0))
    run.wait(10)
    dashboard.join(10)
    assert not dashboard.running and drawn() == 3
    # what the browser showed (JupyterLab, headless chromium): the run's name, its ranks and status, the panels
    assert dashboard.figure.layout.title.text == "run job-1 · 2 ranks (done)"
    panels = {a.text for a in dashboard.figure.layout.annotations}
    assert {"loss vs wall time", "throughput (samples/s, all ranks)"} <= panels


def test_a_restarted_rank_ends_the_line_its_killed_predecessor_cut(folder):
    """The reporter of a new attempt starts on a fresh line, so only the torn
    line is lost, never the new attempt's first event."""
    from ddlkit.rank.reporter import Reporter

    append(folder, 1, step(1, 0) + b'{"rank": 1, "time": 1001.5, "type": "st')  # SIGKILLed mid-write
    reporter = Reporter(1, file=folder / "events-rank1.jsonl")
    reporter.step(0, loss=1.5)
    reporter.close()
    logs = RankLogs(folder)
    assert [(e["type"], e.get("loss")) for e in logs.read()] == [("step", 2.0), ("step", 1.5)]
    assert logs.skipped_lines == 1


def test_a_ranks_first_step_row_is_sent_at_once_not_with_the_next_batch(folder):
    """The notebook shows a run as going when its first step arrives (launch
    latency): that row does not wait up to FLUSH_S for the batch, even right
    after another event was sent."""
    from ddlkit.rank.reporter import Reporter

    path = folder / "events-rank0.jsonl"
    reporter = Reporter(0, file=path)
    reporter.send({"type": "beat", "step": -1}, now=True)  # just sent: a row now would be queued for the batch
    reporter.step(0, loss=1.5)
    assert [json.loads(line).get("step") for line in path.read_text().splitlines()] == [-1, 0]
    reporter.close()
