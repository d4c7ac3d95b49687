"""Hogwild on two CPU processes: one parameter buffer, updated without locks."""

from __future__ import annotations

import os
import stat
import threading
import time
from pathlib import Path

import torch

import ddlkit
from ddlkit import RunConfig

from .strangers import as_stranger, needs_root, open_probe


def test_ranks_share_one_parameter_buffer_and_train(runs_dir):
    steps = 30
    cfg = RunConfig(
        strategy="hogwild",
        world_size=2,
        model="mlp",
        dataset="digits",
        hidden=16,
        steps=steps,
        batch_size=16,
        lr=0.2,
        optimizer="sgd",
        seed=0,
        device="cpu",
        run_dir=runs_dir,
        hang_timeout=60,
    )
    run = ddlkit.launch(cfg, echo=False).wait(timeout=120)
    finished = {e["rank"]: e for e in run.events if e["type"] == "finished"}
    # Each rank applied only its own gradients, on its own data shard; with
    # private copies their parameters would differ. They read the same numbers:
    assert finished[0]["param_checksum"] == finished[1]["param_checksum"]
    saved = run.result().state_dict
    assert abs(sum(v.double().sum().item() for v in saved.values()) - finished[0]["param_checksum"]) < 1e-9
    # The update counter lives in the shared mapping too: each rank saw the
    # other's increments (a lock-free increment can be lost, hence <=).
    assert steps < finished[0]["updates"] <= 2 * steps
    updates = [e for e in run.events if e["type"] == "update"]
    assert len(updates) == 2 * steps and all(e["staleness"] >= 0 for e in updates)
    loss = run.metrics.groupby("step")["loss"].mean()
    assert loss.iloc[-5:].mean() < loss.iloc[:5].mean()
    assert not list(Path("/dev/shm").glob(f"ddlkit-hogwild-{run.id}*"))  # nothing named after the run


def _watch(runs_dir: Path, victim: Path, stop: threading.Event, seen: set[str]) -> None:
    """Another user's part: as soon as the run's folder appears, plant files at
    the names the memory had in /dev/shm, named after the run (a symlink to a
    file of the victim's, a world-writable file); and note every other name
    with the run's id that appears there meanwhile."""
    planted: list[str] = []
    while not stop.is_set():
        runs = list(runs_dir.iterdir()) if runs_dir.exists() else []
        if runs and not planted:
            base = f"/dev/shm/ddlkit-hogwild-{runs[0].name}"
            os.symlink(victim, base + ".params")
            fd = os.open(base + ".clock", os.O_CREAT | os.O_WRONLY, 0o666)
            os.write(fd, b"\xff" * 8)
            os.close(fd)
            os.chmod(base + ".clock", 0o666)
            planted = [Path(base).name + ".params", Path(base).name + ".clock"]
        if runs:
            seen.update(n for n in os.listdir("/dev/shm") if runs[0].name in n and n not in planted)
        time.sleep(0.002)


def _mappings(pid: int) -> list[str]:
    """The writable shared mappings of a process: '<inode> <path>' for each."""
    lines = Path(f"/proc/{pid}/maps").read_text().splitlines()
    return sorted({" ".join(line.split()[4:]) for line in lines if line.split()[1] == "rw-s"})


def _segment_of(pid: int) -> str | None:
    """Rank 0's mapping of the shared memory, as /proc/<pid>/map_files/<range>: it
    lasts the whole run (its descriptor is closed once every rank mapped it)."""
    for entry in os.listdir(f"/proc/{pid}/map_files"):
        try:
            if os.readlink(f"/proc/{pid}/map_files/{entry}").startswith("/memfd:ddlkit-hogwild"):
                return f"/proc/{pid}/map_files/{entry}"
        except OSError:
            continue
    return None


def test_the_shared_memory_has_no_name_to_hijack_and_only_this_user_opens_it(runs_dir, tmp_path):
    """Issue 10, defect 6: the memory was /dev/shm/ddlkit-hogwild-<run id>, a name
    anyone could predict from the runs folder: another user pre-created it, read
    and wrote the parameters, and a symlink made the run overwrite a file of
    the victim's. Now nothing is named: the run ignores whatever is planted,
    and another user cannot open the memory even knowing where it is."""
    needs_root()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n" * 1000)
    stop, seen = threading.Event(), set()
    watcher = threading.Thread(target=_watch, args=(Path(runs_dir), victim, stop, seen))
    watcher.start()
    cfg = RunConfig(strategy="hogwild", world_size=2, hidden=16, steps=400, batch_size=16, lr=0.1, seed=0)
    cfg = cfg.replace(device="cpu", run_dir=runs_dir, delay_s={0: 0.005, 1: 0.005})
    failure, mode, stranger, mapped = None, None, None, None
    try:
        run = ddlkit.launch(cfg, echo=False)
        segment, deadline = None, time.monotonic() + 120
        while segment is None and time.monotonic() < deadline and run.status in ("starting", "running"):
            segment = _segment_of(run.pids[0]) if Path(f"/proc/{run.pids[0]}").exists() else None
            time.sleep(0.01)
        if segment is not None:  # seen while the run goes on
            mode, stranger = stat.S_IMODE(os.stat(segment).st_mode), as_stranger(open_probe, segment)
            while len({tuple(_mappings(pid)) for pid in run.pids}) > 1 and time.monotonic() < deadline:
                time.sleep(0.01)  # until rank 1 has mapped it too
            mapped = [_mappings(pid) for pid in run.pids]
        try:
            run.wait(timeout=180)
        except ddlkit.RunFailed as exc:
            failure = exc
    finally:
        stop.set()
        watcher.join()
        for leftover in Path("/dev/shm").glob("ddlkit-hogwild-*"):
            leftover.unlink()
    assert victim.read_bytes() == b"precious\n" * 1000, "the run wrote through a planted symlink"
    assert seen == set(), f"the run named something in /dev/shm: {seen}"
    assert failure is None, failure
    assert segment is not None, "rank 0 maps no memfd"
    assert mode == 0o600 and stranger == "refused (Permission denied)", (mode, stranger)
    # Both ranks map one and the same anonymous file (its inode), and nothing from /dev/shm.
    assert mapped is not None and mapped[0] == mapped[1] and len(mapped[0]) == 1, mapped
    assert mapped[0][0].endswith("/memfd:ddlkit-hogwild (deleted)"), mapped
    weights = run.result().state_dict
    assert all(torch.isfinite(v).all() for v in weights.values())
    finished = {e["rank"]: e for e in run.events if e["type"] == "finished"}
    assert finished[0]["param_checksum"] == finished[1]["param_checksum"]  # still one shared copy
