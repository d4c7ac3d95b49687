"""The fault table: every way a rank fails, for every kind of strategy (lockstep
data parallel, a parameter server, lock-free Hogwild, a pipeline), and the ways
the kernel's side fails (disk full, run folder removed, kernel killed).

For each, the run must end with a final status within 15 s of the fault, the
right rank named with the right cause, and nothing left: no process, no port,
no ``/dev/shm`` segment, no ``.tmp`` file or folder; and what the kernel holds
(``run.metrics``) is what the folder holds (``events.jsonl``).

The ranks here are small and fast (hang timeout 2 s) so that the whole table
runs in a few minutes on two cores.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

import ddlkit
from ddlkit import RunConfig, RunFailed

from .conftest import in_process_group, port_is_free, remove_folder

RUN_ID = re.compile(r"\d{8}-\d{6}-[0-9a-f]{6}")
FAULT_STEP = 6  # mid-run
FINAL_WITHIN_S = 15.0
HANG_TIMEOUT = 2.0
STRATEGIES = {
    "data": dict(strategy="data", checkpoint_every=2),  # checkpoints: a half-written one must not stay
    "ps": dict(strategy="ps", sync="bsp"),  # rank 0 serves, rank 1 works: the faulty rank is the worker
    "hogwild": dict(strategy="hogwild"),
    "pipeline": dict(strategy="pipeline", pp=2, micro_batches=2),
}
HUNG = "hung: no step for longer than the hang timeout"
# name: (fault kind, step, what rank 1's line in the failure report says)
KINDS = {
    "raise": ("exception", FAULT_STEP, f"raised: RuntimeError: injected fault at step {FAULT_STEP}"),
    "exit": ("exit", FAULT_STEP, "exited with code 3 without a traceback"),
    "sigkill": ("sigkill", FAULT_STEP, "killed by SIGKILL without a traceback"),
    "sigstop": ("sigstop", FAULT_STEP, f"{HUNG} (last step "),
    "hang-at-step-0": ("hang", 0, f"{HUNG} (last step -1)"),
    "hang-mid-run": ("hang", FAULT_STEP, f"{HUNG} (last step {FAULT_STEP - 1})"),
}


def _config(runs_dir, **changes) -> RunConfig:
    return RunConfig(
        world_size=2,
        steps=3 * FAULT_STEP,
        batch_size=8,
        hidden=16,
        device="cpu",
        run_dir=runs_dir,
        hang_timeout=HANG_TIMEOUT,
    ).replace(**changes)


def _shm() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


def _held() -> set[str]:
    """The /dev/shm names some process has open or mapped (other runs on this machine, say)."""
    held = set()
    for proc in Path("/proc").iterdir():
        try:
            held.update(
                line.split("/dev/shm/", 1)[1].split()[0]
                for line in (proc / "maps").read_text().splitlines()
                if "/dev/shm/" in line
            )
            held.update(
                os.readlink(fd).removeprefix("/dev/shm/")
                for fd in (proc / "fd").iterdir()
                if os.readlink(fd).startswith("/dev/shm/")
            )
        except OSError:
            continue
    return held


def _follow(run: ddlkit.Run, limit: float = 120.0) -> tuple[float, float]:
    """Wait for the run's end: (when all its ranks had connected, when it ended)."""
    running_at, deadline = None, time.time() + limit
    while True:
        try:
            run.wait(timeout=0.05)
            break
        except TimeoutError:
            pass
        except RunFailed:
            break
        if running_at is None and run.status == "running":
            running_at = time.time()
        assert time.time() < deadline, f"run {run.id} still {run.status} after {limit} s"
    return running_at or run.started, time.time()


def _assert_nothing_left(pids: list[int], ports: list[int], shm_before: set[str], folder: Path) -> None:
    for pid in pids:
        assert in_process_group(pid) == [], f"processes left in worker group {pid}"
    for port in ports:
        assert port_is_free(port), f"port {port} still in use"
    # A leak is a segment no process holds any more; one named after another run is that run's
    # (other tests on this machine may hold theirs, or make some on purpose).
    left = {name for name in _shm() - shm_before - _held() if RUN_ID.findall(name) in ([], [folder.name])}
    assert left == set(), "shared memory segments left in /dev/shm"
    assert list(folder.rglob("*.tmp")) == [], "half-written files or checkpoints left"


def _step_lines(folder: Path) -> int:
    """Step events in events.jsonl (a torn last line, if any, is no event)."""
    text = (folder / "events.jsonl").read_text()
    lines = text.splitlines() if text.endswith("\n") else text.splitlines()[:-1]
    return sum(1 for line in lines if json.loads(line).get("type") == "step")


def _assert_record_matches(run: ddlkit.Run) -> None:
    """Memory and disk hold the same rows, and the folder reads back as the same table."""
    assert _step_lines(run.path) == len(run.metrics)
    assert len(ddlkit.load_run(run.path).metrics) == len(run.metrics)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_a_failing_rank(runs_dir, strategy, kind):
    fault_kind, step, cause = KINDS[kind]
    shm_before = _shm()
    cfg = _config(runs_dir, **STRATEGIES[strategy], fault={"rank": 1, "step": step, "kind": fault_kind})
    run = ddlkit.launch(cfg, echo=False)
    running_at, ended_at = _follow(run)

    assert run.status == "failed"
    report = run.error or ""
    assert "first failure: rank 1" in report, report
    (line,) = [ln for ln in report.splitlines() if ln.startswith("  rank 1:")]
    assert cause in line and line.endswith("<- first failure"), report
    if fault_kind == "sigstop":
        assert "stopped by a signal (SIGSTOP" in line, report
    # The fault fired after the culprit's last step row (if any arrived) and after all ranks connected.
    rows = run.metrics
    culprit_rows = rows[rows["rank"] == 1] if "rank" in rows else rows
    fault_after = max(running_at, run.started + (culprit_rows["time"].max() if len(culprit_rows) else 0.0))
    assert ended_at - fault_after < FINAL_WITHIN_S, f"final status {ended_at - fault_after:.1f} s after the fault"
    _assert_nothing_left(run.pids, run.ports, shm_before, run.path)
    _assert_record_matches(run)


# ---- the kernel's side ---------------------------------------------------------
ENDLESS = dict(strategy="data", steps=1_000_000, checkpoint_every=5)


def _wait_for_rows(run: ddlkit.Run, rows: int, timeout: float = 90.0) -> None:
    deadline = time.time() + timeout
    while len(run.metrics) < rows:
        assert run.live and time.time() < deadline, f"run {run.status} with {len(run.metrics)} rows"
        time.sleep(0.05)


@pytest.fixture
def small_disk(tmp_path, monkeypatch):
    """A 4 MiB tmpfs (root can mount one) and a function that fills it. Where
    mounting is not allowed, the disk fills as far as the kernel can tell: its
    writes fail with ENOSPC (the workers' do not)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], capture_output=True)
    full = {"now": False}

    def fill() -> None:
        if mounted.returncode == 0:
            with open(disk / "filler", "wb", buffering=0) as f:
                for block in (65536, 1):  # to the last byte
                    try:
                        while True:
                            f.write(b"\0" * block)
                    except OSError:
                        pass
        full["now"] = True

    if mounted.returncode != 0:
        from ddlkit.kernel.records import RecordError, RunLog

        real_append = RunLog.append

        def append(self, events):
            if full["now"]:
                raise RecordError(f"cannot write {self.path}: [Errno 28] No space left on device")
            real_append(self, events)

        monkeypatch.setattr(RunLog, "append", append)
    yield disk, fill
    if mounted.returncode == 0:
        subprocess.run(["umount", "-l", str(disk)], check=True)


def test_disk_full(small_disk):
    disk, fill = small_disk
    shm_before = _shm()
    run = ddlkit.launch(_config(str(disk / "runs"), **ENDLESS), echo=False)
    _wait_for_rows(run, 40)
    fill()
    full_at = time.time()
    _, ended_at = _follow(run, limit=60)
    assert run.status == "failed"
    assert "No space left on device" in (run.error or ""), run.error
    assert (run.error or "").startswith(f"run {run.id} failed: cannot write "), run.error
    assert ended_at - full_at < FINAL_WITHIN_S
    _assert_nothing_left(run.pids, run.ports, shm_before, run.path)
    (disk / "filler").unlink(missing_ok=True)  # summary.json could not be written; the events are whole
    _assert_record_matches(run)


def test_run_folder_removed(runs_dir):
    shm_before = _shm()
    run = ddlkit.launch(_config(runs_dir, **ENDLESS), echo=False)
    _wait_for_rows(run, 40)
    removed_at = time.time()
    remove_folder(run.path)  # as `rm -rf` does, while the ranks write into it
    _, ended_at = _follow(run, limit=60)
    assert run.status == "failed"
    assert "the file was deleted (was the run folder removed?)" in (run.error or ""), run.error
    assert ended_at - removed_at < FINAL_WITHIN_S
    assert not run.path.exists()  # not made again by a rank's checkpoint or a log
    _assert_nothing_left(run.pids, run.ports, shm_before, run.path)
    assert len(run.metrics) == sum(1 for e in run.events if e["type"] == "step")  # nothing half recorded


KERNEL = """
import sys, time, ddlkit
cfg = ddlkit.RunConfig(strategy="data", world_size=2, steps=1_000_000, batch_size=8, hidden=16, device="cpu",
                       run_dir=sys.argv[1], hang_timeout=2)
run = ddlkit.launch(cfg, echo=False)
print(run.path, flush=True)
while len(run.metrics) < 40:
    time.sleep(0.05)
print("training", flush=True)
time.sleep(600)
"""


def test_kernel_killed(runs_dir):
    """The notebook's kernel dies (SIGKILL: no atexit, no cleanup): its workers
    notice their parent is gone and end, and the folder reads back."""
    shm_before = _shm()
    kernel = subprocess.Popen([sys.executable, "-c", KERNEL, runs_dir], stdout=subprocess.PIPE, text=True)
    try:
        assert kernel.stdout is not None
        folder = Path(kernel.stdout.readline().strip())
        assert kernel.stdout.readline().strip() == "training"
        meta = json.loads((folder / "run.json").read_text())
        kernel.kill()
        killed_at = time.time()
        kernel.wait(timeout=10)
        while any(in_process_group(pid) for pid in meta["pids"]) and time.time() < killed_at + FINAL_WITHIN_S:
            time.sleep(0.1)
    finally:
        kernel.kill()
        kernel.wait(timeout=10)
        if kernel.stdout is not None:
            kernel.stdout.close()
    _assert_nothing_left(meta["pids"], meta["ports"], shm_before, folder)
    run = ddlkit.load_run(folder)  # a torn last line, if any, is skipped with a warning
    assert run.status == "stopped"  # never finished, never failed: its kernel went away
    assert _step_lines(folder) == len(run.metrics) >= 40
