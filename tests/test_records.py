"""A run's folder: read back whatever happened to it (a torn last line, a
folder that is not a run), and written so that memory and disk agree even when
the disk fills up or the folder is removed."""

from __future__ import annotations

import errno
import json
import os

import pytest

import ddlkit
from ddlkit import RunConfig, checkpoint
from ddlkit.kernel import records
from ddlkit.kernel.records import RecordError, RunLog, load_run
from ddlkit.kernel.run import Run

from .conftest import remove_folder


def _steps(n, rank=0, start=0):
    return [{"type": "step", "rank": rank, "step": s, "time": 100.0 + s, "loss": 1.0} for s in range(start, start + n)]


def _folder(path, events, summary=None, meta=True):
    path.mkdir(parents=True, exist_ok=True)
    if meta:
        (path / "run.json").write_text(json.dumps({"id": path.name, "started": 99.0, "world_size": 1}))
    (path / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    if summary is not None:
        (path / "summary.json").write_text(json.dumps(summary))
    return path


# ---- reading back ---------------------------------------------------------------
def test_a_torn_last_line_is_skipped_with_a_warning(tmp_path):
    folder = _folder(tmp_path / "run", _steps(5))
    with open(folder / "events.jsonl", "a") as f:
        f.write('{"type": "step", "rank": 0, "st')  # the kernel died (or the disk filled) mid-write
    with pytest.warns(UserWarning, match="torn last line"):
        run = load_run(folder)
    assert run.metrics["step"].tolist() == [0, 1, 2, 3, 4]
    assert run.status == "stopped"  # no summary: its kernel never finished it


def test_lines_that_are_not_events_are_skipped_and_named(tmp_path):
    folder = _folder(tmp_path / "run", _steps(3))
    with open(folder / "events.jsonl", "ab") as f:
        f.write(b"\xff\xfe not text\n[1, 2]\n" + json.dumps(_steps(1, start=3)[0]).encode() + b"\n")
    with pytest.warns(UserWarning, match=r"skipped 2 line\(s\) that are not events \(lines \[4, 5\]\)"):
        run = load_run(folder)
    assert run.metrics["step"].tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize(
    "files, why",
    [
        ({}, "it has no run.json, events.jsonl or events-rank<r>.jsonl"),
        ({"run.json": "{not json"}, "run.json is not JSON"),
        ({"run.json": "[1, 2]"}, "run.json holds a list"),
        ({"run.json": '{"world_size": "two"}'}, "run.json has world_size='two'"),
        ({"run.json": '{"world_size": 0}', "events.jsonl": ""}, "neither run.json nor any event names a rank"),
        ({"events.jsonl": "1\n2\n"}, "events.jsonl holds no events"),
        ({"events.jsonl": '{"type": "step"}\n'}, "events.jsonl holds no events"),  # no rank, step or time
        ({"events-rank0.jsonl": "\x00\x01\x02\n"}, "events-rank0.jsonl holds no events"),
        ({"events-rank0.jsonl": '{"type": "beat", "time": 1.0}\n'}, "neither run.json nor any event names a rank"),
    ],
)
def test_a_folder_that_is_not_a_run_raises_one_clear_error(tmp_path, files, why):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=f"is not a run folder: {why}".replace("(", r"\(").replace(")", r"\)")):
        load_run(tmp_path)


def test_a_summary_that_is_not_one_is_made_again_from_the_events(tmp_path):
    folder = _folder(tmp_path / "run", [*_steps(2), {"type": "finished", "rank": 0, "time": 103.0}], summary=[1])
    with pytest.warns(UserWarning, match="is not a run summary"):
        run = load_run(folder)
    assert run.status == "done" and run.summary["steps"] == 2


def test_a_resumed_log_starts_its_first_line_whole(tmp_path):
    """The next kernel appends to a log whose last line its predecessor tore:
    that line is ended first, so the new events do not merge into it."""
    folder = _folder(tmp_path / "run", _steps(3))
    with open(folder / "events.jsonl", "a") as f:
        f.write('{"type": "step", "ra')
    run = Run("run", folder, 1, 99.0, {})
    log = RunLog(run)
    log.append(_steps(2, start=3))
    log.close({"status": "done"})
    with pytest.warns(UserWarning, match=r"lines \[4\]"):
        assert load_run(folder).metrics["step"].tolist() == [0, 1, 2, 3, 4]


# ---- writing: memory and disk agree -------------------------------------------
def test_a_write_that_fails_leaves_no_torn_line_and_nothing_only_in_memory(tmp_path, monkeypatch):
    folder = tmp_path / "run"
    folder.mkdir()
    run = Run("run", folder, 1, 99.0, {})
    log = RunLog(run)
    log.append(_steps(3))
    real_write = os.write

    def disk_fills_up(fd, data):  # room for a few bytes, then none
        if fd == log._fd and len(data) > 10:
            real_write(fd, bytes(data[:10]))
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(records.os, "write", disk_fills_up)
    with pytest.raises(RecordError, match=r"cannot write .*events.jsonl: \[Errno 28\] No space left on device"):
        log.append(_steps(2, start=3))
    monkeypatch.undo()
    assert len(run.metrics) == 3  # the batch that did not reach the disk did not join the Run either
    assert (folder / "events.jsonl").read_bytes().endswith(b"}\n")  # cut back to the last whole line
    assert len(load_run(folder).metrics) == 3


def test_a_log_whose_folder_was_removed_fails_at_its_next_write(tmp_path):
    import shutil

    folder = tmp_path / "run"
    folder.mkdir()
    log = RunLog(Run("run", folder, 1, 99.0, {}))
    log.append(_steps(1))
    shutil.rmtree(folder)
    with pytest.raises(RecordError, match="the file was deleted"):
        log.append(_steps(1, start=1))
    with pytest.raises(RecordError, match="summary.json"):
        log.close({"status": "failed"})


# ---- a run whose folder cannot be written ends, failed, and leaves nothing ------------
def _long_cfg(runs_dir, **changes):
    return RunConfig(
        strategy="data",
        world_size=2,
        steps=100_000,
        batch_size=8,
        run_dir=runs_dir,
        checkpoint_every=5,
        hang_timeout=60,
    ).replace(**changes)


def _wait_for_rows(run, rows, timeout=60.0):
    import time

    deadline = time.time() + timeout
    while len(run.metrics) < rows:
        assert run.live and time.time() < deadline, f"run {run.status} with {len(run.metrics)} rows"
        time.sleep(0.05)


def test_disk_full_while_recording_fails_the_run_naming_the_error(runs_dir, monkeypatch):
    """The kernel's own writes fail (injected ENOSPC; tests/test_fault_table.py
    fills a real tmpfs): the run ends failed within seconds, naming the error,
    with no worker, port or half-written checkpoint left (the fixture checks
    processes and ports)."""
    real_append = RunLog.append
    full = {"now": False}

    def append(self, events):
        if full["now"]:
            raise RecordError(f"cannot write {self.path}: [Errno 28] No space left on device")
        real_append(self, events)

    monkeypatch.setattr(RunLog, "append", append)
    run = ddlkit.launch(_long_cfg(runs_dir), echo=False)
    _wait_for_rows(run, 40)
    full["now"] = True
    with pytest.raises(ddlkit.RunFailed, match="No space left on device") as info:
        run.wait(timeout=30)
    assert "first failure" not in str(info.value)  # no rank is blamed for the kernel's disk
    assert run.summary["status"] == "failed"
    assert list(checkpoint.folder_of(run.path).glob("*.tmp")) == []


def test_a_run_folder_removed_mid_run_fails_the_run(runs_dir):
    run = ddlkit.launch(_long_cfg(runs_dir), echo=False)
    _wait_for_rows(run, 40)
    remove_folder(run.path)  # as `rm -rf` does, while the ranks write into it
    with pytest.raises(ddlkit.RunFailed, match="the file was deleted"):
        run.wait(timeout=30)
    assert not run.path.exists()  # not made again: the folder was removed on purpose
