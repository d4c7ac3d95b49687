"""Every test that starts workers proves none is left when it ends, also when
it fails: no child process of this one (but the warm starter, which lives as
long as this process, and must have no child left), nothing in a worker's
process group, and every port a run used free again."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from ddlkit.kernel import forkserver
from ddlkit.kernel.run import Run
from ddlkit.kernel.supervisor import Supervisor


def _processes():
    """(pid, parent pid, process group, state) of every process, from /proc."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            yield int(entry.name), int(fields[1]), int(fields[2]), fields[0]


def children_of(pid: int) -> list[int]:
    return [child for child, parent, _, _ in _processes() if parent == pid]


def in_process_group(pgid: int) -> list[int]:
    return [member for member, _, group, _ in _processes() if group == pgid]


def running_in_process_group(pgid: int) -> list[int]:
    """Members that are not zombies (an orphan's zombie waits for whoever reaps orphans here)."""
    return [member for member, _, group, state in _processes() if group == pgid and state != "Z"]


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _left(before: set[int]) -> set[int]:
    """Processes started since ``before``: children of this one, and the warm starter's ranks."""
    warm = forkserver.current()
    left = set(children_of(os.getpid())) - before
    if warm is not None and warm.alive:
        children = set(children_of(warm.pid))
        try:
            children -= set(warm.probe()["spares"])  # they wait to become ranks
        except (forkserver.StarterUnavailable, OSError):  # it ended meanwhile: its children count
            pass
        left = (left - {warm.pid}) | children
    return left


@pytest.fixture(autouse=True)
def no_leftovers(monkeypatch):
    """Track every run the test starts; afterwards stop any still live and
    assert that nothing of them is left."""
    started: list[Run] = []
    original = Supervisor.start

    def tracking(self, *args, **kwargs):
        started.append(self.run)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Supervisor, "start", tracking)
    before = set(children_of(os.getpid()))
    yield started
    for run in started:
        run.stop(timeout=15)
    deadline = time.time() + 10
    while time.time() < deadline and _left(before):
        time.sleep(0.1)
    assert _left(before) == set(), "worker processes left behind"
    for run in started:
        assert run.status not in ("starting", "running"), f"run {run.id} still {run.status}"
        for pid in run.pids:
            assert in_process_group(pid) == [], f"processes left in worker group {pid}"
        for port in run.ports:
            assert port_is_free(port), f"port {port} still in use after run {run.id}"


@pytest.fixture
def runs_dir(tmp_path):
    return str(tmp_path / "runs")


def assert_nothing_left(run_path) -> None:
    """For runs started in another process (the CLI): the pids and ports that
    run.json recorded are gone."""
    import json

    meta = json.loads((Path(run_path) / "run.json").read_text())
    for pid in meta["pids"]:
        assert in_process_group(pid) == [], f"processes left in worker group {pid}"
    for port in meta["ports"]:
        assert port_is_free(port)


def remove_folder(path) -> None:
    """``rm -rf path``, repeated while the ranks still write into it: one pass
    can leave the folder behind when a rank creates a file in it meanwhile."""
    import shutil

    for _ in range(100):
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.exists(path):
            return
        time.sleep(0.01)
    raise AssertionError(f"{path} could not be removed")
