"""Load balancing: heterogeneous ranks, idle time split from transfer time,
and data parallelism that shares each global batch by speed and stays exact."""

from __future__ import annotations

import time

import pytest
import torch

import ddlkit
from ddlkit import RunConfig
from ddlkit.data import ShardedStream, split_batch


def _train(runs_dir, **changes):
    cfg = RunConfig(
        strategy="data",
        model="mlp",
        dataset="digits",
        steps=8,
        lr=0.1,
        optimizer="sgd",
        seed=0,
        device="cpu",
        hidden=32,
        run_dir=runs_dir,
        hang_timeout=60,
    ).replace(**changes)
    return ddlkit.launch(cfg, echo=False).wait(timeout=120)


def _worst(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _balances(run) -> dict[int, list[tuple[int, list[int]]]]:
    out: dict[int, list[tuple[int, list[int]]]] = {}
    for event in run.events:
        if event["type"] == "balance":
            out.setdefault(event["rank"], []).append((event["step"], event["shares"]))
    return out


@pytest.mark.parametrize(
    "world_size, changes",
    [
        (2, dict(balance="static", speeds={1: 0.5})),  # 21 + 11 of 32, from the first step
        (3, dict(balance="dynamic", balance_every=2, speeds={2: 0.25})),  # re-shared every 2 steps
    ],
)
def test_weighted_uneven_shares_equal_one_process_on_the_global_batch(runs_dir, world_size, changes):
    balanced = _train(runs_dir, world_size=world_size, batch_size=16, **changes)
    single = _train(runs_dir, strategy="single", world_size=1, batch_size=16 * world_size)
    shares = _balances(balanced)[0]
    assert all(sum(s) == 16 * world_size for _, s in shares)
    assert any(len(set(s)) > 1 for _, s in shares)  # the shares really were uneven
    assert _worst(balanced.result().state_dict, single.result().state_dict) < 1e-5
    # the weighting is what makes it exact: unweighted uneven means would step differently
    rows = balanced.metrics
    assert sorted(set(rows["samples"])) != [16]


def test_dynamic_resharing_switches_every_rank_at_the_same_step_and_the_rows_follow(runs_dir):
    run = _train(runs_dir, world_size=2, batch_size=32, steps=12, balance="dynamic", balance_every=3, speeds={1: 0.3})
    balances = _balances(run)
    assert balances[0] == balances[1]  # same steps, same shares, on every rank
    assert [step for step, _ in balances[0]] == [0, 3, 6, 9]  # declared at the start, then every 3 steps
    in_force = dict(balances[0])
    rows = run.metrics
    for step in range(12):
        shares = in_force[max(s for s in in_force if s <= step)]
        at = rows[rows["step"] == step].set_index("rank")["samples"]
        assert [at[0], at[1]] == shares and sum(shares) == 64
    assert balances[0][-1][1][0] > balances[0][-1][1][1]  # the slow rank takes less


def test_changing_shares_mid_epoch_loses_and_repeats_no_sample():
    n, batch, world = 100, 5, 3  # a global batch of 15: epochs end mid-batch
    streams = [ShardedStream(n, batch, rank, world, seed=1) for rank in range(world)]
    seen: list[int] = []
    for step in range(20):  # 300 positions: three whole epochs
        if step % 4 == 1:
            shares = split_batch(15, [1.0 + (step * r) % 3 for r in range(world)])
            for stream in streams:
                stream.set_shares(shares)
        seen += [i for stream in streams for i in stream.indices(step).tolist()]
    for epoch in range(3):
        assert sorted(seen[epoch * n : (epoch + 1) * n]) == list(range(n))
    with pytest.raises(ValueError, match="adding up to the global batch 15"):
        streams[0].set_shares([5, 5, 4])


def test_idle_is_split_from_transfer_and_shows_on_the_peers_of_a_slow_rank(runs_dir):
    run = _train(runs_dir, world_size=2, batch_size=128, hidden=256, steps=16, time_every=1, speeds={1: 0.25})
    rows = run.metrics[run.metrics["step"] >= 2]  # past the warm-up
    assert rows["idle_s"].notna().all() and rows["transfer_s"].notna().all()
    split = rows["idle_s"] + rows["transfer_s"]
    # the split adds up to the communication window, read on separate clocks
    assert ((rows["comm_s"] - split).abs() <= 0.2 * rows["comm_s"] + 2e-4).all()
    idle = rows.groupby("rank")["idle_s"].median()
    compute = rows.groupby("rank")["compute_s"].median()
    assert idle[0] > 4 * idle[1]  # the fast rank waits, the slow one hardly (scheduling noise on 2 loaded cores)
    assert idle[0] > 0.5 * (compute[1] - compute[0])  # ... for about the slow rank's extra work


@pytest.mark.parametrize("strategy", ["fsdp", "pipeline"])
def test_the_rank_loop_times_idle_for_lockstep_strategies_without_a_hook(runs_dir, strategy):
    # rank 1 sleeps 40 ms after each step: rank 0 waits that long for it at the probe
    run = _train(runs_dir, strategy=strategy, world_size=2, steps=7, time_every=2, delay_s={1: 0.04})
    rows = run.metrics
    sampled = rows[rows["idle_s"].notna()]
    assert sorted(set(sampled["step"])) == [0, 2, 4, 6] and len(sampled) == 8  # both ranks, sampled steps only
    assert (sampled["comm_s"] == sampled["idle_s"] + sampled["transfer_s"]).all()
    idle = sampled[sampled["step"] >= 2].groupby("rank")["idle_s"].median()
    assert idle[0] > 0.03 and idle[1] < 0.01  # the peer waits, the slow rank does not
    assert ddlkit.balance.idle_table(run)["idle_fraction"][0] > 3 * ddlkit.balance.idle_table(run)["idle_fraction"][1]


def test_timing_only_sampled_steps_leaves_the_others_estimated(runs_dir):
    run = _train(runs_dir, world_size=2, batch_size=16, steps=12, time_every=5)
    rows = run.metrics
    sampled = rows[rows["idle_s"].notna()]
    assert sorted(set(sampled["step"])) == [0, 5, 10]
    others = rows[rows["idle_s"].isna()]
    assert (others["comm_s"] > 0).all() and (others["compute_s"] > 0).all()  # split by the last sample's shares


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(speeds={1: 0.0}), r"speeds=\{1: 0.0\} is invalid: it must be None or a dict \{rank: speed > 0\}"),
        (dict(speeds={1: -2}), r"speeds=\{1: -2\} is invalid"),
        (dict(speeds={2: 0.5}), r"speeds=\{2: 0.5\} is invalid: .* ranks 0..1"),
        (dict(speeds=[0.5, 1.0]), r"speeds=\[0.5, 1.0\] is invalid"),
        (dict(rank_profile="egde"), r"rank_profile='egde' is invalid: valid values are .*did you mean 'edge'"),
        (dict(balance="always"), r"balance='always' is invalid: valid values are \['none', 'static', 'dynamic'\]"),
        (dict(balance_every=0), r"balance_every=0 is invalid: it must be a positive integer"),
        (dict(time_every=0), r"time_every=0 is invalid: it must be a positive integer"),
        (dict(balance="static", grad_accumulation=2), r"balance='static' is invalid with grad_accumulation=2"),
        (dict(sample_work_s=-1e-3), r"sample_work_s=-0.001 is invalid: it must be a number >= 0"),
        (
            dict(strategy="pipeline", pp=2, balance="dynamic"),
            r"balance='dynamic' is invalid for strategy='pipeline': it is read by \['data'\]",
        ),
        (
            dict(strategy="single", world_size=1, balance="static"),
            r"balance='static' is invalid for strategy='single'",
        ),
    ],
)
def test_bad_balancing_input_is_one_clear_error_before_launch(runs_dir, changes, message):
    with pytest.raises(ValueError, match=message):  # as the value is set, or at the latest by launch()
        ddlkit.launch(RunConfig(strategy="data", world_size=2, run_dir=runs_dir, device="cpu").replace(**changes))


@pytest.mark.parametrize("strategy, extra", [("ps", dict(sync="async")), ("hogwild", {})])
def test_a_persistent_speed_slows_its_rank_in_an_asynchronous_strategy(runs_dir, strategy, extra):
    # each rank steps on its own: the rank at a quarter speed takes about 4x as long per step
    run = _train(runs_dir, strategy=strategy, world_size=3, steps=10, delay_s={1: 0.02, 2: 0.02}, speeds={2: 0.25},
                 **extra)  # fmt: skip
    rows = run.metrics[run.metrics["step"] >= 1]
    per_rank = rows.groupby("rank")["step_time"].median()
    assert per_rank[2] > 2.5 * per_rank[1]


def test_a_rank_profile_draws_speeds_for_the_ranks_from_the_seed():
    from ddlkit.speeds import rank_speeds

    edge = rank_speeds(None, "edge", world_size=8, seed=0)
    assert max(edge) == 1.0 and min(edge) < 0.5  # a spread, the fastest at this machine's speed
    assert edge == rank_speeds(None, "edge", world_size=8, seed=0) != rank_speeds(None, "edge", world_size=8, seed=1)
    assert rank_speeds({3: 0.1}, "uniform", world_size=4) == [1.0, 1.0, 1.0, 0.1]


def _pipeline(runs_dir, **changes):
    cfg = RunConfig(
        strategy="pipeline",
        world_size=2,
        pp=2,
        model="lm",
        dataset="sonnets",
        seq_len=512,  # long windows: the position embedding holds most parameters, the blocks most of the time
        hidden=16,
        batch_size=4,
        micro_batches=2,
        steps=4,
        lr=0.05,
        device="cpu",
        run_dir=runs_dir,
        hang_timeout=60,
    ).replace(**changes)
    return ddlkit.launch(cfg, echo=False).wait(timeout=180)


def test_auto_cuts_beat_parameter_count_cuts_on_the_lm_and_train_the_same(runs_dir):
    by_params = _pipeline(runs_dir)
    auto = _pipeline(runs_dir, cut_points="auto")
    (report,) = [e for e in auto.events if e["type"] == "cuts"]
    assert report["param_cuts"] == [1] and report["cuts"] == [2]  # the embedding alone vs a block per stage
    assert max(report["stage_s"]) < 0.75 * max(report["param_stage_s"])
    rows = {name: run.metrics[run.metrics["step"] >= 1] for name, run in (("params", by_params), ("auto", auto))}
    slowest_stage = {name: r.groupby("rank")["compute_s"].median().max() for name, r in rows.items()}
    step_time = {name: r.groupby("step")["step_time"].max().median() for name, r in rows.items()}
    assert slowest_stage["auto"] < 0.8 * slowest_stage["params"]  # measured in the runs: about 0.5x
    assert step_time["auto"] < 1.25 * step_time["params"]  # never slower beyond noise (measured: ~0.65x; 2 busy cores)
    # profiling runs forward and backward but drops the gradients: training is unchanged
    assert _worst(auto.result().state_dict, by_params.result().state_dict) < 1e-5


def test_auto_cuts_are_a_valid_partition_of_every_layer(runs_dir):
    run = _pipeline(
        runs_dir,
        model="mlp",
        dataset="digits",
        schedule="interleaved",
        micro_batches=2,
        steps=2,
        seq_len=32,
        cut_points="auto",
        hidden=64,
    )
    (report,) = [e for e in run.events if e["type"] == "cuts"]
    cuts, layers = report["cuts"], len(report["layer_s"])
    assert layers == 5 and len(cuts) == 3  # 2 ranks x 2 stages (interleaved)
    bounds = [0, *cuts, layers]
    assert all(bounds[k] < bounds[k + 1] for k in range(4))  # every stage non-empty, every layer in exactly one
    assert report["stage_s"] == pytest.approx([sum(report["layer_s"][bounds[k] : bounds[k + 1]]) for k in range(4)])
    assert max(report["stage_s"]) <= max(report["param_stage_s"]) + 1e-12  # never worse on the measured times


def test_the_comm_timer_wraps_any_hook_and_pauses_once_per_step(tmp_path):
    import torch.distributed as dist

    from ddlkit.strategies.commtimer import CommTimer

    calls: list[object] = []

    def compressing_hook(state, bucket):  # stands for a strategy's chosen hook (fp16, PowerSGD, top-k)
        calls.append((state, bucket))
        fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
        fut.set_result(torch.ones(3))
        return fut

    class Ctx:
        step_started, paused = 0.0, 0

        def straggle(self, started, simulated_s=0.0):
            self.paused += 1
            return 0.0

    timer, ctx = CommTimer(compressing_hook), Ctx()
    timer.ctx = ctx  # type: ignore[assignment]
    ctx.step_started = time.perf_counter()
    timer.start(sampled=False)
    assert [timer.hook("s", b).value().sum().item() for b in ("b0", "b1", "b2")] == [3.0, 3.0, 3.0]
    assert calls == [("s", "b0"), ("s", "b1"), ("s", "b2")] and ctx.paused == 1  # the pause: at the first bucket
    assert timer.idle_s == timer.transfer_s == 0.0 and timer.busy_s > 0  # unsampled: nothing timed
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        timer.start(sampled=True)
        assert timer.hook("s", "b0").wait().sum().item() == 3.0
        assert timer.idle_s > 0 and timer.transfer_s > 0 and ctx.paused == 2
        assert timer.comm_s >= timer.transfer_s
    finally:
        dist.destroy_process_group()
