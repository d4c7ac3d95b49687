"""Beyond one machine: the same experiment under torchrun agents standing in
for two nodes, equal to the single-node run, with nothing left afterwards."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch

import ddlkit
from ddlkit import RunConfig
from tests.nodes import Agents


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
    return RunConfig(strategy=strategy, world_size=4, steps=6, batch_size=8, hidden=16, device="cpu", **extra)


def the_folder(runs: Path) -> Path:
    folders = list(runs.iterdir())
    assert len(folders) == 1, f"the ranks did not agree on one run folder: {folders}"
    return folders[0]


def assert_same_weights(a: dict, b: dict, tolerance: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst < tolerance, worst


def test_two_torchrun_agents_make_one_exact_4_rank_data_run(agents, tmp_path, runs_dir):
    cfg = small()
    cfg.save(tmp_path / "exp.yaml")
    for _node in range(2):
        agents.start(tmp_path / "exp.yaml", nnodes=2, nproc=2)
    assert agents.wait(240) == [0, 0], agents.logs()
    folder = the_folder(tmp_path / "runs")
    assert sorted(p.name for p in folder.glob("events-rank*.jsonl")) == [f"events-rank{r}.jsonl" for r in range(4)]
    two_nodes = ddlkit.load_run(folder)
    assert two_nodes.status == "done" and two_nodes.world_size == 4
    assert sorted(two_nodes.metrics.groupby("rank")["step"].max().items()) == [(r, 5) for r in range(4)]

    reference = ddlkit.launch(small(run_dir=runs_dir), echo=False).wait(240)
    one_node = torch.load(reference.path / "final_state.pt", weights_only=True)
    assert_same_weights(two_nodes.result().state_dict, one_node)
