"""Held-out evaluation for every strategy (``eval_every``): a seeded split
that no rank trains on, measured by the strategy's evaluating rank before the
first step, every ``eval_every`` steps and after the last."""

from __future__ import annotations

import torch

import ddlkit
from ddlkit.data import held_out_split, load_dataset
from ddlkit.rank.evaluate import due

SMALL = ddlkit.RunConfig(world_size=2, hidden=16, steps=10, batch_size=16, lr=0.3, device="cpu", eval_every=4)


def evals(run) -> list[dict]:
    return [e for e in run.events if e["type"] == "eval"]


def test_the_split_is_disjoint_complete_and_keeps_text_windows_apart():
    digits = load_dataset("digits")
    train, test = held_out_split(digits, seed=0)
    assert len(test) == int(0.2 * len(digits)) and set(train.tolist()).isdisjoint(test.tolist())
    assert sorted(torch.cat([train, test]).tolist()) == list(range(len(digits)))
    assert not torch.equal(held_out_split(digits, seed=1)[1], test)  # seeded
    sonnets = load_dataset("sonnets", seq_len=32)
    train, test = held_out_split(sonnets)
    assert test.min() - train.max() > 32  # no character in both a training and a held-out window
    assert [due(done, 4, last=10) for done in range(11)] == [d in (0, 4, 8, 10) for d in range(11)]


def test_data_parallel_measures_on_rank_0_and_trains_like_single_on_the_same_split(runs_dir):
    data = ddlkit.launch(SMALL.replace(strategy="data", run_dir=runs_dir), echo=False).wait(120)
    single = ddlkit.launch(
        SMALL.replace(strategy="single", world_size=1, batch_size=32, run_dir=runs_dir), echo=False
    ).wait(120)
    measured = evals(data)
    assert [(e["rank"], e["step"]) for e in measured] == [(0, 0), (0, 4), (0, 8), (0, 10)]
    assert all(e["samples"] == 359 and 0 <= e["accuracy"] <= 1 for e in measured)
    assert measured[-1]["loss"] < measured[0]["loss"]
    a, b = data.result().state_dict, single.result().state_dict
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5  # both train on the same 1438 samples
    assert [round(e["loss"], 4) for e in evals(single)] == [round(e["loss"], 4) for e in measured]


def test_a_parameter_server_run_is_measured_by_its_first_worker(runs_dir):
    run = ddlkit.launch(SMALL.replace(strategy="ps", world_size=3, sync="bsp", run_dir=runs_dir), echo=False).wait(120)
    assert {e["rank"] for e in evals(run)} == {1} and [e["step"] for e in evals(run)] == [0, 4, 8, 10]
