"""Parameter servers end to end: 1 server + 2 workers on CPU over gloo
(ranks 1 and 2 are the workers), tiny model, few steps."""

from __future__ import annotations

import time

import pytest

import ddlkit
from ddlkit import RunConfig, RunFailed


def _config(runs_dir, **changes) -> RunConfig:
    return RunConfig(
        strategy="ps",
        world_size=3,
        model="mlp",
        dataset="digits",
        hidden=16,
        steps=8,
        batch_size=16,
        lr=0.1,
        optimizer="sgd",
        seed=0,
        device="cpu",
        run_dir=runs_dir,
        hang_timeout=60,
    ).replace(**changes)


def _train(runs_dir, **changes):
    return ddlkit.launch(_config(runs_dir, **changes), echo=False).wait(timeout=120)


def _updates(run) -> list[dict]:
    return [e for e in run.events if e["type"] == "update"]


def _max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_ssp_with_bound_zero_is_bsp_whatever_the_arrival_order(runs_dir):
    """Same data order means: worker w's batch at step n is the same samples in
    both runs (the shard of n over the workers), and a clock's gradients are
    summed in worker rank order. ssp(0) runs under a 3x straggler and random
    delays, so its gradients arrive in another order than bsp's, and must still
    give bit-identical parameters."""
    bsp = _train(runs_dir, sync="bsp")
    ssp = _train(runs_dir, sync="ssp", staleness_bound=0, slowdown={2: 3.0}, delay_jitter_s=0.01)
    assert _max_difference(bsp.result().state_dict, ssp.result().state_dict) == 0.0
    assert all(e["staleness"] == 0 for e in _updates(bsp) + _updates(ssp))
    # ... and the parameters really depend on the schedule: async differs
    asynchronous = _train(runs_dir, sync="async", slowdown={2: 3.0})
    assert _max_difference(bsp.result().state_dict, asynchronous.result().state_dict) > 1e-4


def test_ssp_never_applies_an_update_staler_than_the_bound(runs_dir):
    bound = 2
    run = _train(runs_dir, sync="ssp", staleness_bound=bound, steps=14, slowdown={2: 3.0})
    updates = _updates(run)
    assert len(updates) == 2 * 14  # one per gradient of each worker, none dropped
    assert all(0 <= e["staleness"] <= bound and not e["dropped"] for e in updates)
    assert all(e["staleness"] == e["applied_version"] - e["read_version"] for e in updates)
    # the fast worker really runs ahead up to the bound: the bound is what stops it
    assert max(e["staleness"] for e in updates if e["worker"] == 1) == bound
    # workers see the staleness of their gradients in their step events
    rows = run.metrics
    assert rows["staleness"].max() == bound


def test_scripted_delays_give_the_staleness_computed_by_hand(runs_dir):
    """async, worker 1 pushes every 0.4 s, worker 2 every 1.0 s (plus a few ms
    of work; the closest arrivals are 0.2 s apart). Pushes arrive at 0.4 (w1 s0),
    0.8 (w1 s1), 1.0 (w2 s0), 1.2 (w1 s2), 1.6 (w1 s3), 2.0 (w2 s1), 3.0 (w2 s2),
    4.0 (w2 s3); the server version counts applied updates and a worker reads the
    version its reply carries:
      w1 s0 reads 0, applied at 0 -> 0    w1 s1 reads 1, applied at 1 -> 0
      w2 s0 reads 0, applied at 2 -> 2    w1 s2 reads 2, applied at 3 -> 1
      w1 s3 reads 4, applied at 4 -> 0    w2 s1 reads 3, applied at 5 -> 2
      w2 s2 reads 6, applied at 6 -> 0    w2 s3 reads 7, applied at 7 -> 0"""
    run = _train(runs_dir, sync="async", steps=4, delay_s={1: 0.4, 2: 1.0})
    expected = [
        (1, 0, 0, 0),
        (1, 1, 1, 1),
        (2, 0, 0, 2),
        (1, 2, 2, 3),
        (1, 3, 4, 4),
        (2, 1, 3, 5),
        (2, 2, 6, 6),
        (2, 3, 7, 7),
    ]
    recorded = [(e["worker"], e["step"], e["read_version"], e["applied_version"]) for e in _updates(run)]
    assert recorded == expected
    assert [e["staleness"] for e in _updates(run)] == [0, 0, 2, 1, 0, 2, 0, 0]
    rows = run.metrics.sort_values(["rank", "step"])
    assert rows[rows["rank"] == 1]["staleness"].tolist() == [0, 0, 1, 0]
    assert rows[rows["rank"] == 2]["staleness"].tolist() == [2, 2, 0, 0]


def test_staleness_limit_drops_old_gradients(runs_dir):
    """The script above with max_staleness=1: w2 s0 (staleness 2) is dropped;
    w2 s1 then reads 2 and arrives after w1's two last updates: staleness 2, dropped."""
    run = _train(runs_dir, sync="async", steps=4, delay_s={1: 0.4, 2: 1.0}, max_staleness=1)
    updates = _updates(run)
    dropped = [e for e in updates if e["dropped"]]
    # the two staleness-2 gradients of the script above are dropped, and a
    # dropped gradient does not advance the version
    assert [(e["worker"], e["step"]) for e in dropped] == [(2, 0), (2, 1)]
    assert all(e["staleness"] == 2 for e in dropped)
    assert [e["applied_version"] for e in updates if not e["dropped"]] == list(range(6))


def test_staleness_lr_divides_a_gradient_by_its_staleness():
    from types import SimpleNamespace

    import torch

    from ddlkit.rank.strategy import make_optimizer
    from ddlkit.strategies.ps import ParameterServer

    cfg = RunConfig(strategy="ps", world_size=2, lr=1.0, optimizer="sgd", staleness_lr=True)
    model = torch.nn.Linear(2, 1, bias=False)
    before = model.weight.detach().clone()
    server = ParameterServer(
        cfg, SimpleNamespace(process_index=0, num_processes=2), model, "regress", make_optimizer(cfg)
    )
    server.apply([(4, torch.tensor([4.0, 8.0]))])  # SGD, lr 1, staleness 4: a step of gradient / 4
    assert torch.allclose(model.weight.detach(), before - torch.tensor([[1.0, 2.0]]), atol=1e-6)
    server.apply([(0, torch.tensor([1.0, 1.0]))])  # fresh gradients are not scaled up
    assert torch.allclose(model.weight.detach(), before - torch.tensor([[2.0, 3.0]]), atol=1e-6)


def test_two_servers_shard_the_parameters_and_compute_the_same(runs_dir):
    one = _train(runs_dir, sync="bsp", steps=4)
    two = _train(runs_dir, sync="bsp", steps=4, servers=2, world_size=4)
    assert _max_difference(one.result().state_dict, two.result().state_dict) == 0.0
    assert {e["rank"] for e in _updates(two)} == {0, 1}  # both servers applied updates


def test_async_is_faster_than_bsp_with_a_straggler(runs_dir):
    """The trade in one number each: async's fast worker is not held back."""
    per_step = 0.05
    bsp = _train(runs_dir, sync="bsp", steps=10, delay_s={1: per_step, 2: 3 * per_step})
    asynchronous = _train(runs_dir, sync="async", steps=10, delay_s={1: per_step, 2: 3 * per_step})
    fast_worker_bsp = bsp.metrics[bsp.metrics["rank"] == 1]["wait_s"].sum()
    fast_worker_async = asynchronous.metrics[asynchronous.metrics["rank"] == 1]["wait_s"].sum()
    assert fast_worker_bsp > 10 * 2 * per_step * 0.7  # waits ~2 x per_step each step for the straggler
    assert fast_worker_async < fast_worker_bsp / 3
    assert max(e["staleness"] for e in _updates(asynchronous)) >= 2


def test_live_slowdown_reaches_a_worker(runs_dir):
    run = ddlkit.launch(_config(runs_dir, sync="async", steps=400, delay_s={1: 0.01, 2: 0.01}), echo=False)
    deadline = time.time() + 60
    while time.time() < deadline and len(run.metrics) < 10:
        time.sleep(0.1)
    run.control(slowdown={2: 20.0})
    time.sleep(2.0)
    run.control(stop=True)
    run.wait(timeout=120)
    rows = run.metrics
    applied = [e for e in run.events if e["type"] == "control" and "slowdown" in e]
    assert applied and applied[0]["slowdown"] == {"2": 20.0}
    late = rows[rows["time"] > rows["time"].max() - 1.0]
    assert (late["rank"] == 1).sum() > 3 * (late["rank"] == 2).sum()  # worker 1 now steps much faster


def test_a_killed_worker_fails_the_run_with_its_name(runs_dir):
    run = ddlkit.launch(
        _config(runs_dir, sync="bsp", steps=200, fault={"rank": 2, "step": 3, "kind": "sigkill"}), echo=False
    )
    with pytest.raises(RunFailed) as info:
        run.wait(timeout=90)
    message = str(info.value)
    assert "first failure: rank 2" in message and "rank 2: killed by SIGKILL" in message


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"sync": "eventual"}, "sync='eventual' is invalid"),
        ({"staleness_bound": -1}, "staleness_bound=-1 is invalid"),
        ({"servers": 3}, "servers=3 is invalid with world_size=3"),
        ({"servers": 0}, "servers=0 is invalid"),
        ({"max_staleness": 2, "sync": "ssp"}, "valid only with sync='async'"),
        ({"max_staleness": -1}, "max_staleness=-1 is invalid"),
        ({"slowdown": {5: 3.0}}, "slowdown={5: 3.0} is invalid"),
        ({"slowdown": {1: 0.5}}, "slowdown={1: 0.5} is invalid"),
        ({"delay_s": {"x": 1}}, "delay_s={'x': 1} is invalid"),
        ({"delay_jitter_s": -0.1}, "delay_jitter_s=-0.1 is invalid"),
    ],
)
def test_bad_configs_are_refused_before_launch(runs_dir, changes, words):
    with pytest.raises(ValueError) as info:
        ddlkit.launch(_config(runs_dir, **changes), echo=False)
    assert words in str(info.value)


def test_rank_keys_from_json_become_integers(tmp_path):
    cfg = RunConfig(strategy="ps", world_size=3, slowdown={2: 3.0}, delay_s={1: 0.1})
    cfg.save(tmp_path / "c.json")
    again = RunConfig.load(tmp_path / "c.json")
    assert again.slowdown == {2: 3.0} and again.delay_s == {1: 0.1} and again == cfg
    again.validate()
