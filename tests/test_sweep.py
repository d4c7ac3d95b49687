"""Speedup sweeps: explicit batch semantics, refusals before any run, and a
real sweep's table and figure."""

from __future__ import annotations

import os

import pytest

import ddlkit
from ddlkit import RunConfig
from ddlkit.view.sweeps import config_at


def test_global_batch_is_split_and_per_rank_batch_is_kept():
    cfg = RunConfig(strategy="data", world_size=1, batch_size=64)
    assert [config_at(cfg, n, "global").batch_size for n in (1, 2, 4)] == [64, 32, 16]
    assert [config_at(cfg, n, "per_rank").batch_size for n in (1, 2, 4)] == [64, 64, 64]
    assert config_at(cfg.replace(world_size=2, batch_size=16), 4, "global").batch_size == 8  # global 32 kept


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"world_sizes": [1, 3]}, "world size 3 cannot split the global batch of 32"),
        ({"threads": 0}, "threads=0 is invalid: it must be None or a positive integer"),
        ({"batch": "weak"}, "batch='weak' is invalid: valid values are ['global', 'per_rank']"),
        ({"world_sizes": [1, 2], "cfg": RunConfig(strategy="single", world_size=1)}, "invalid for strategy='single'"),
    ],
)
def test_a_bad_sweep_is_refused_before_any_run_starts(no_leftovers, runs_dir, kwargs, message):
    cfg = kwargs.pop("cfg", RunConfig(strategy="data", world_size=1, batch_size=32)).replace(run_dir=runs_dir)
    with pytest.raises(ValueError) as error:
        ddlkit.sweep(cfg, **kwargs)
    assert message in str(error.value)
    assert no_leftovers == []  # not even the first size ran


def test_a_sweep_measures_speedup_and_flags_oversubscription(runs_dir):
    cfg = RunConfig(strategy="data", world_size=1, batch_size=32, steps=30, lr=0.3, device="cpu", run_dir=runs_dir)
    result = ddlkit.sweep(cfg, world_sizes=[1, 4])
    table, cores = result.table, len(os.sched_getaffinity(0))
    assert list(table["world_size"]) == [1, 4] and list(table["batch_per_rank"]) == [32, 8]
    assert (table["global_batch"] == 32).all() and (table["threads_per_rank"] == 1).all()
    assert [run.status for run in result.runs] == ["done", "done"]
    rates = [run.summary["samples_per_s"] for run in result.runs]
    assert list(table["samples_per_s"]) == pytest.approx(rates)
    assert list(table["speedup"]) == pytest.approx([1.0, rates[1] / rates[0]])
    assert list(table["efficiency"]) == pytest.approx([1.0, rates[1] / rates[0] / 4])
    assert list(table["cores_per_rank"]) == pytest.approx([cores, cores / 4])
    assert list(table["oversubscribed"]) == [1 > cores, 4 > cores]
    assert table["time_to_target_s"].notna().all()  # the default target is one every run reached
    assert table.attrs["target_loss"] == pytest.approx(table["final_loss"].max())
    names = [trace.name for trace in result.figure.data]
    assert "ideal" in names and "measured speedup" in names
    measured = next(t for t in result.figure.data if t.name == "measured speedup")
    assert list(measured.y) == pytest.approx(list(table["speedup"]))  # the figure draws the table's numbers
