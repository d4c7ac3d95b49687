"""Data parallelism, end to end on two CPU processes over gloo."""

from __future__ import annotations

import json

import pytest

import ddlkit
from ddlkit import RunConfig


def _train(runs_dir, **changes):
    cfg = RunConfig(
        model="mlp",
        dataset="digits",
        steps=12,
        lr=0.1,
        optimizer="sgd",
        seed=0,
        device="cpu",
        run_dir=runs_dir,
        hang_timeout=60,
    ).replace(**changes)
    return ddlkit.launch(cfg, echo=False).wait(timeout=120)


def test_gradient_averaging_equals_large_batch_training(runs_dir):
    """N=2 ranks with batch B step exactly like one process with batch 2B on the same samples."""
    data = _train(runs_dir, strategy="data", world_size=2, batch_size=16).result().state_dict
    single = _train(runs_dir, strategy="single", world_size=1, batch_size=32).result().state_dict
    assert data.keys() == single.keys()
    worst = max((data[k] - single[k]).abs().max().item() for k in data)
    assert worst < 1e-5
    # ... and training really moved the weights, so the agreement means something
    other_seed = _train(runs_dir, strategy="single", world_size=1, batch_size=32, seed=1).result().state_dict
    assert max((other_seed[k] - single[k]).abs().max().item() for k in single) > 1e-2


def test_exactly_one_row_per_rank_and_logged_step(runs_dir):
    run = _train(runs_dir, strategy="data", world_size=2, batch_size=8, steps=23, log_every=5)
    logged = [0, 5, 10, 15, 20, 22]  # every 5th step and the last
    table = run.metrics
    assert len(table) == 2 * len(logged)
    for rank in (0, 1):
        assert table[table["rank"] == rank]["step"].tolist() == logged
    assert not table.duplicated(["rank", "step"]).any()
    assert {"loss", "samples", "step_time", "compute_s", "comm_s", "wait_s", "lr", "time"} <= set(table)
    assert (table["comm_s"] > 0).all()  # two ranks really all-reduce
    assert run.summary["steps"] == 23 and run.summary["samples"] == 23 * 8 * 2


def test_the_log_reloads_into_the_same_table(runs_dir):
    run = _train(runs_dir, strategy="data", world_size=2, batch_size=8, steps=15)
    again = ddlkit.load_run(run.path)
    assert again.status == "done" and again.id == run.id
    assert again.metrics.equals(run.metrics)
    on_disk = [json.loads(line) for line in (run.path / "events.jsonl").read_text().splitlines()]
    assert (
        len(on_disk) == len(run.events) == 2 * 15 + 2 * 2 + 2
    )  # steps of both ranks, their "memory" and "comm", 2 "finished"
    assert again.summary == run.summary
    assert ddlkit.RunConfig.load(run.path / "config.json").steps == 15


@pytest.mark.parametrize("model, dataset", [("cnn", "digits"), ("lm", "sonnets"), ("mlp", "regression")])
def test_other_models_train_data_parallel(runs_dir, model, dataset):
    run = _train(
        runs_dir,
        strategy="data",
        world_size=2,
        batch_size=16,
        steps=30,
        model=model,
        dataset=dataset,
        optimizer="adam",
        lr=3e-3,
        hidden=32,
    )
    loss = run.metrics.groupby("step")["loss"].mean()
    assert loss.iloc[-5:].mean() < loss.iloc[:5].mean()


def test_runs_finish_done_every_time(runs_dir):
    """DDP on gloo can abort at interpreter exit after a clean finish; a
    finished run must never be reported failed for it."""
    for seed in range(4):
        assert _train(runs_dir, strategy="data", world_size=2, batch_size=8, steps=5, seed=seed).status == "done"


def test_a_cpu_rank_draws_what_torch_manual_seed_would_give():
    """The rank loop seeds a CPU rank's generator alone (torch.manual_seed took 4-5 ms in a fresh
    rank, formatting stacks for accelerators it has not got): the same numbers follow."""
    import torch

    from ddlkit.rank.loop import seed

    torch.manual_seed(5)
    expected = torch.randn(8)
    seed(5, torch.device("cpu"))
    assert torch.equal(torch.randn(8), expected)
