"""ddlkit slurm: the sbatch script is valid bash, refuses what Slurm or the run
would refuse, and runs for real on this machine as a one-node job (srun and
scontrol stood in for by two tiny scripts)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import ddlkit
from ddlkit import RunConfig
from ddlkit.cli import main
from tests.nodes import tagged
from tests.test_multinode import free_port


def write_config(folder: Path, world_size: int) -> Path:
    path = folder / "exp.yaml"
    RunConfig(world_size=world_size, steps=4, batch_size=8, hidden=16, device="cpu", hang_timeout=30.0).save(path)
    return path


def test_the_script_is_valid_bash_and_the_dry_run_prints_it(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path, 32)
    flags = ["--nodes", "4", "--gpus-per-node", "8", "--partition", "gpu", "--time", "02:00:00", "--max-restarts", "2"]
    assert main(["slurm", str(config), *flags, "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert not (tmp_path / "exp.sbatch").exists()
    assert main(["slurm", str(config), *flags]) == 0
    assert "sbatch " + str(tmp_path / "exp.sbatch") in capsys.readouterr().out
    script = (tmp_path / "exp.sbatch").read_text()
    assert script == printed
    assert subprocess.run(["bash", "-n", tmp_path / "exp.sbatch"], capture_output=True).returncode == 0
    for line in (
        "#SBATCH --nodes=4",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --partition=gpu",
        "#SBATCH --time=02:00:00",
    ):
        assert line in script.splitlines()
    for arg in ("--nnodes=4", "--nproc-per-node=8", "--rdzv-backend=c10d", "--max-restarts=2"):
        assert arg in script
    assert '--rdzv-endpoint="$head_node:29500"' in script and '--rdzv-id="ddlkit-$SLURM_JOB_ID"' in script
    assert f"-m ddlkit.worker {config}" in script and f"--chdir={tmp_path}" in script


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--nodes", "2", "--gpus-per-node", "8"], "world_size is 32, but 2 nodes x 8 processes start 16 ranks"),
        (["--nodes", "4", "--gpus-per-node", "8", "--time", "soon"], "--time 'soon' is not a Slurm time limit"),
        (["--nodes", "4", "--gpus-per-node", "8", "--partition", "a b"], "--partition is 'a b'"),
        (["--nodes", "0", "--gpus-per-node", "8"], "--nodes and --procs-per-node must be at least 1"),
        (["--nodes", "4", "--gpus-per-node", "8", "--port", "80"], "--port 80 is not a port a user may bind"),
    ],
)
def test_what_slurm_or_the_run_would_refuse_is_refused_first(tmp_path, capsys, flags, message):
    config = write_config(tmp_path, 32)
    assert main(["slurm", str(config), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "exp.sbatch").exists()


def test_the_script_runs_as_a_one_node_job_on_this_machine(tmp_path, capsys, monkeypatch):
    """The whole script, with `srun` running its command once (one node) and
    `scontrol` naming this machine: torchrun starts 2 ranks that write
    runs/ddlkit-<job id>/, where follow() finds the finished run."""
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path, 2)
    port = free_port()
    assert main(["slurm", str(config), "--nodes", "1", "--procs-per-node", "2", "--port", str(port)]) == 0
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text('#!/bin/sh\nwhile [ "${1#--}" != "$1" ]; do shift; done\nexec "$@"\n')
    (fake / "scontrol").write_text("#!/bin/sh\necho 127.0.0.1\n")
    for tool in ("srun", "scontrol"):
        (fake / tool).chmod(0o755)
    tag = f"slurm-{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC", "DDLKIT_", "MASTER_"))}
    env.update(PATH=f"{fake}:{env['PATH']}", SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="node1", DDLKIT_TEST_TAG=tag)
    try:
        done = subprocess.run(
            ["bash", tmp_path / "exp.sbatch"], env=env, capture_output=True, text=True, timeout=240, cwd="/"
        )
    finally:
        for pid in tagged(tag):
            os.kill(pid, 9)
    assert done.returncode == 0, done.stderr[-3000:]
    run = ddlkit.follow(tmp_path / "runs" / "ddlkit-4242")
    assert run.wait(30).status == "done" and run.world_size == 2
    assert sorted(run.metrics.groupby("rank")["step"].max().items()) == [(0, 3), (1, 3)]
    assert tagged(tag) == []
    assert sys.executable in (tmp_path / "exp.sbatch").read_text()  # the same interpreter, hence the same ddlkit
