"""No other local user can read or steer a run (issue 10, defects 9 and 10).
The other user is a forked child of the test running as uid 65534
(``tests/strangers.py``)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

import ddlkit
from ddlkit import RunConfig

from .strangers import needs_root

MODE_VARIABLE = "DDLKIT_RUN_MODE"  # ddlkit.files.MODE_VARIABLE, spelled out as a user would


# ---- 9: a run id from outside is a name, never a path ------------------------------
def _worker(cfg_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC", "DDLKIT", "MASTER_"))}
    return subprocess.run(
        [sys.executable, "-m", "ddlkit.worker", str(cfg_path)],
        env={**clean, "RANK": "0", "WORLD_SIZE": "1", **env},
        cwd=cfg_path.parent,
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_a_run_id_planted_in_the_agents_store_is_refused(tmp_path):
    """Under torchrun the ranks agree on a folder through the agent's store, which
    any local user can write to: a value that is not a ddlkit run id ends the
    rank with a clear error and nothing is written where it points."""
    from torch.distributed import TCPStore

    RunConfig(world_size=1, steps=3, batch_size=8, hidden=8, device="cpu").save(tmp_path / "exp.yaml")
    agent = TCPStore("127.0.0.1", 0, None, True, timedelta(seconds=30), wait_for_workers=False)
    agent.set("ddlkit/run_id", "../planted")  # what another user put there first
    env = {"TORCHELASTIC_USE_AGENT_STORE": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(agent.port)}
    done = _worker(tmp_path / "exp.yaml", env)
    assert done.returncode != 0
    assert "'../planted'" in done.stderr and "will not be used as a folder name" in done.stderr
    assert not (tmp_path / "planted").exists() and not (tmp_path / "runs").exists()
    # A launcher's own id must be a plain name too.
    done = _worker(tmp_path / "exp.yaml", {"TORCHELASTIC_RUN_ID": "../../elsewhere"})
    assert done.returncode != 0 and "TORCHELASTIC_RUN_ID" in done.stderr
    assert not (tmp_path.parent / "elsewhere").exists()
    # A folder another user made in advance under that name is not written into.
    needs_root()
    trap = tmp_path / "runs" / "job-7"
    trap.mkdir(parents=True)
    os.chown(trap, 65534, 65534)
    done = _worker(tmp_path / "exp.yaml", {"TORCHELASTIC_RUN_ID": "job-7"})
    assert done.returncode != 0 and "is not a folder of this user's" in done.stderr
    assert list(trap.iterdir()) == []


def test_a_rank_started_by_another_launcher_writes_privately(tmp_path):
    RunConfig(world_size=1, steps=3, batch_size=8, hidden=8, device="cpu").save(tmp_path / "exp.yaml")
    done = _worker(tmp_path / "exp.yaml", {"TORCHELASTIC_RUN_ID": "job-42"})
    assert done.returncode == 0, done.stderr[-2000:]
    folder = tmp_path / "runs" / "job-42"
    assert {p.name for p in folder.iterdir()} >= {"config.json", "events-rank0.jsonl", "final_state.pt"}
    assert _modes(folder) == ({0o700}, {0o600})


# ---- 10: private run folders, wider only when asked --------------------------------
def _modes(folder: Path) -> tuple[set[int], set[int]]:
    """The permission bits of the folder and every folder under it, and of every file."""
    paths = [folder, *folder.rglob("*")]
    folders = {stat.S_IMODE(p.stat().st_mode) for p in paths if p.is_dir()}
    files = {stat.S_IMODE(p.stat().st_mode) for p in paths if p.is_file()}
    return folders, files


def _returns(value):
    ddlkit.log(step=0, loss=1.0)
    return {"value": value}


def _run_everything(runs_dir: str) -> list[Path]:
    """A run that writes every kind of file: checkpoints, logs, events, final
    weights, config, summary and a report; and a function run that returns values."""
    cfg = RunConfig(steps=6, world_size=2, batch_size=8, hidden=8, checkpoint_every=2, run_dir=runs_dir)
    run = ddlkit.launch(cfg, echo=False).wait(timeout=120)
    ddlkit.report(run, run.path / "report.html")
    function_run = ddlkit.launch(_returns, 7, num_processes=2, run_dir=runs_dir, echo=False).wait(timeout=120)
    return [run.path, function_run.path]


def test_run_folders_and_files_are_private(runs_dir):
    old = os.umask(0o022)  # the usual umask: without care, folders 0755 and files 0644
    try:
        folders = _run_everything(runs_dir)
    finally:
        os.umask(old)
    config_run, function_run = folders
    names = {p.relative_to(config_run).as_posix() for p in config_run.rglob("*")}
    assert {"config.json", "run.json", "summary.json", "events.jsonl", "rank0.log", "rank1.log"} <= names
    assert {"final_state.pt", "report.html"} <= names
    assert [n for n in names if n.startswith("checkpoints/step-") and n.endswith("/manifest.json")]
    assert {"return-rank0.pt", "return-rank1.pt"} <= {p.name for p in function_run.iterdir()}
    for folder in folders:
        assert _modes(folder) == ({0o700}, {0o600}), folder
    assert stat.S_IMODE(Path(runs_dir).stat().st_mode) == 0o700  # the runs folder ddlkit made


def test_wider_modes_only_when_asked(runs_dir, monkeypatch):
    monkeypatch.setenv(MODE_VARIABLE, "750")
    for folder in _run_everything(runs_dir):
        assert _modes(folder) == ({0o750}, {0o640}), folder


@pytest.mark.parametrize("value", ["777", "0644", "770", "abc", "7000", "-700"])
def test_a_bad_mode_is_refused_before_anything_is_written(runs_dir, monkeypatch, value):
    monkeypatch.setenv(MODE_VARIABLE, value)
    with pytest.raises(ValueError, match=f"{MODE_VARIABLE}=.* is invalid: .*700 .*750 .*755"):
        ddlkit.launch(RunConfig(run_dir=runs_dir), echo=False)
    assert not Path(runs_dir).exists()
