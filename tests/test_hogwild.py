"""Hogwild on two CPU processes: one parameter buffer, updated without locks."""

from __future__ import annotations

from pathlib import Path

import ddlkit
from ddlkit import RunConfig


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
    assert not list(Path("/dev/shm").glob(f"ddlkit-hogwild-{run.id}*"))  # the names are gone
