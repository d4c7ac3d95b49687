"""Beyond one machine: the same experiment under torchrun agents standing in
for two nodes, equal to the single-node run, with nothing left afterwards."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import ddlkit
from ddlkit import RunConfig
from tests.conftest import children_of
from tests.nodes import Agents, Namespaces


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def agents(tmp_path):
    """torchrun agents, killed and proven gone on every exit path of the test."""
    group = Agents(tmp_path, free_port())
    yield group
    group.kill()
    group.assert_gone()


def small(strategy: str = "data", **extra) -> RunConfig:
    fields = {"world_size": 4, "steps": 6, "batch_size": 8, "hidden": 16, "device": "cpu", **extra}
    return RunConfig(strategy=strategy, **fields)


def the_folder(runs: Path) -> Path:
    folders = list(runs.iterdir())
    assert len(folders) == 1, f"the ranks did not agree on one run folder: {folders}"
    return folders[0]


def assert_same_weights(a: dict, b: dict, tolerance: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst < tolerance, worst


def until(condition, timeout: float, what: str, agents: Agents) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}\n{agents.logs()}"
        time.sleep(0.05)


def test_two_torchrun_agents_make_one_exact_4_rank_data_run_followed_and_steered_live(agents, tmp_path, runs_dir):
    """2 agents x 2 ranks: one folder with 4 rank logs, followed while it runs
    (paused and resumed through the control file), weights equal to ddlkit's own
    4-process run; and the same under two `accelerate launch` machines."""
    cfg = small(steps=40, delay_s={0: 0.1})  # rank 0 waits 0.1 s a step, so the run is seen live (weights unchanged)
    cfg.save(tmp_path / "exp.yaml")
    for _node in range(2):
        agents.start(tmp_path / "exp.yaml", nnodes=2, nproc=2)
    until(lambda: (tmp_path / "runs").exists() and any((tmp_path / "runs").iterdir()), 120, "the run folder", agents)
    run = ddlkit.follow(the_folder(tmp_path / "runs"), poll_s=0.05)
    until(lambda: not run.metrics.empty and run.metrics["rank"].nunique() == 4, 120, "rows of all 4 ranks", agents)
    assert run.live and run.world_size == 4
    run.pause()
    until(lambda: any(e["type"] == "control" and e.get("paused") for e in run.events), 60, "the pause", agents)
    steps_seen = run.steps_done
    time.sleep(1.0)
    assert run.status == "running" and run.steps_done == steps_seen < 40  # paused and live
    assert all(proc.poll() is None for proc in agents.procs)
    run.resume()
    assert run.wait(240).status == "done", agents.logs()
    assert agents.wait(60) == [0, 0], agents.logs()
    folder = run.path
    assert sorted(p.name for p in folder.glob("events-rank*.jsonl")) == [f"events-rank{r}.jsonl" for r in range(4)]
    assert run.world_size == 4 and sorted(run.metrics.groupby("rank")["step"].max().items()) == [
        (r, 39) for r in range(4)
    ]
    assert len(run.metrics) == 4 * 40  # every row once, though read while written
    by_rank_step = ["rank", "step"]
    read_after = ddlkit.load_run(folder).metrics.sort_values(by_rank_step, ignore_index=True)
    assert read_after.equals(run.metrics.sort_values(by_rank_step, ignore_index=True))  # live read = read after

    reference = ddlkit.launch(small(steps=40, run_dir=runs_dir), echo=False).wait(240)  # no delay: the same math
    one_node = torch.load(reference.path / "final_state.pt", weights_only=True)
    assert_same_weights(run.result().state_dict, one_node)

    # The same two nodes under accelerate launch's multi-node flags (its own run folder).
    small(steps=40, run_dir="runs-accelerate").save(tmp_path / "accelerate.yaml")
    for _node in range(2):
        agents.start(tmp_path / "accelerate.yaml", nnodes=2, nproc=2, launcher="accelerate")
    assert agents.wait(240) == [0, 0, 0, 0], agents.logs()
    accelerated = ddlkit.load_run(the_folder(tmp_path / "runs-accelerate"))
    assert accelerated.status == "done" and accelerated.world_size == 4
    assert_same_weights(accelerated.result().state_dict, one_node)


def test_a_rank_killed_on_node_1_is_restarted_by_torchrun_from_the_checkpoint(agents, tmp_path):
    """torchrun --max-restarts 1 on both agents; a rank of node 1 is SIGKILLed
    after the first checkpoint: every rank starts again in the same folder,
    resumes from the newest checkpoint, and follow() shows the restart."""
    every = 10
    cfg = small(steps=30, checkpoint_every=every, hang_timeout=30.0, delay_s={0: 0.05})
    cfg.save(tmp_path / "exp.yaml")
    for _node in range(2):
        agents.start(tmp_path / "exp.yaml", nnodes=2, nproc=2, extra=["--max-restarts=1"])
    until(lambda: (tmp_path / "runs").exists() and any((tmp_path / "runs").iterdir()), 120, "the run folder", agents)
    run = ddlkit.follow(the_folder(tmp_path / "runs"), poll_s=0.05)
    until(
        lambda: any(e["type"] == "checkpoint" for e in run.events) and run.steps_done > every + 2,
        120,
        "a checkpoint",
        agents,
    )
    victim = children_of(agents.procs[1].pid)[0]  # a rank torchrun started on node 1
    os.kill(victim, signal.SIGKILL)
    killed_at = run.steps_done
    assert run.wait(240).status == "done", agents.logs()
    assert agents.wait(60) == [0, 0], agents.logs()
    [restart] = [e for e in run.events if e["type"] == "restart"]
    assert restart["attempt"] == 1 and restart["from_step"] % every == 0 and restart["checkpoint"]
    redone = killed_at - restart["from_step"]
    assert 0 <= redone <= every, (killed_at, restart)
    assert [p.name for p in (tmp_path / "runs").iterdir()] == [run.path.name]  # one folder, attempts going on
    assert sorted(run.metrics.groupby("rank")["step"].max().items()) == [(r, 29) for r in range(4)]
    assert sorted(run.metrics.groupby("rank").size().items()) == [(r, 30) for r in range(4)]  # redone rows once
    assert ddlkit.load_run(run.path).status == "done"


@pytest.fixture(scope="module")
def namespaces():
    """Two network namespaces and a veth pair (root only), deleted on every exit path."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip(f"network namespaces need root and iproute2 (uid {os.geteuid()}, ip: {shutil.which('ip')})")
    nodes = Namespaces()
    try:
        nodes.create()
        yield nodes
    finally:
        nodes.delete()
        nodes.assert_gone()


ACROSS_NODES = {
    "hybrid": {"dp": 2, "tp": 2},  # ranks 0,1 on node 0 and 2,3 on node 1: tensor parallel within, dp across
    "ps": {"sync": "bsp"},  # the server on rank 0, three workers: bsp is deterministic
}


@pytest.mark.parametrize("strategy", sorted(ACROSS_NODES))
def test_two_nodes_in_network_namespaces_equal_one_node(strategy, namespaces, agents, tmp_path, runs_dir):
    """Each agent in its own namespace, gloo on its veth end (GLOO_SOCKET_IFNAME),
    the rendezvous on node 0's address: the run crosses the veth pair and its
    weights equal ddlkit's own single-node run."""
    cfg = small(strategy, hang_timeout=30.0, **ACROSS_NODES[strategy])
    cfg.save(tmp_path / "exp.yaml")
    sent_before = namespaces.bytes_sent(1)
    for node in range(2):
        agents.start(
            tmp_path / "exp.yaml",
            nnodes=2,
            nproc=2,
            endpoint=namespaces.addresses[0],
            netns=namespaces.names[node],
            env={"GLOO_SOCKET_IFNAME": namespaces.veths[node]},
            # node 0 hosts the rendezvous; each publishes its own address (not the shared hostname)
            extra=[f"--rdzv-conf=is_host={int(node == 0)}", f"--local-addr={namespaces.addresses[node]}"],
        )
    assert agents.wait(240) == [0, 0], agents.logs()
    run = ddlkit.load_run(the_folder(tmp_path / "runs"))
    assert run.status == "done" and run.world_size == 4
    model_bytes = sum(t.numel() * t.element_size() for t in run.result().state_dict.values())
    assert namespaces.bytes_sent(1) - sent_before > cfg.steps * model_bytes  # the gradients went over the veth

    reference = ddlkit.launch(small(strategy, run_dir=runs_dir, **ACROSS_NODES[strategy]), echo=False).wait(240)
    one_node = torch.load(reference.path / "final_state.pt", weights_only=True)
    assert_same_weights(run.result().state_dict, one_node)


def test_a_config_whose_world_size_is_not_the_launchers_is_refused_before_anything_starts(tmp_path):
    small(world_size=2).save(tmp_path / "exp.yaml")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC", "DDLKIT_", "MASTER_"))}
    done = subprocess.run(
        [sys.executable, "-m", "ddlkit.worker", "exp.yaml"],
        env={**clean, "RANK": "0", "WORLD_SIZE": "4", "TORCHELASTIC_RUN_ID": "job-1"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert "ValueError: exp.yaml has world_size: 2, but the launcher started 4 ranks (WORLD_SIZE)" in done.stderr
    assert not (tmp_path / "runs").exists()
