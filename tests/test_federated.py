"""Federated learning end to end: rank 0 serves, the other ranks train the
virtual clients. Exactness against `single`, weighting by samples, secure
aggregation, a client rank killed mid-round, live knobs, devices, DP, and
bad input refused before launch. Small model (mlp, hidden 16) on digits."""

from __future__ import annotations

import time

import pytest
import torch

import ddlkit
from ddlkit import RunConfig, partition
from ddlkit.data import load_dataset
from ddlkit.strategies.fedplan import combine, server_update

BASE = RunConfig(
    strategy="federated",
    world_size=3,
    model="mlp",
    dataset="digits",
    hidden=16,
    lr=0.1,
    optimizer="sgd",
    seed=0,
    device="cpu",
    hang_timeout=60,
    clients=12,
    rounds=4,
)
DIGITS = len(load_dataset("digits"))
DROPS = BASE.replace(fraction=0.5, dropout=0.3, local_epochs=2, eval_every=2)  # 4 rounds, some clients vanish
_runs: dict[str, ddlkit.Run] = {}


def train(runs_dir, cfg: RunConfig):
    return ddlkit.launch(cfg.replace(run_dir=runs_dir), echo=False).wait(timeout=180)


def once(runs_dir, name: str, cfg: RunConfig):
    """A run several tests read (trained once per session)."""
    if name not in _runs:
        _runs[name] = train(runs_dir, cfg)
    return _runs[name]


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def of_type(run, kind: str) -> list[dict]:
    return [e for e in run.events if e["type"] == kind]


def test_fedsgd_is_full_batch_gradient_descent_on_the_union_of_uneven_clients(runs_dir):
    """Every client every round, one full-batch step (E=1, B=None): the
    sample-weighted mean of the client updates is one gradient step on all the
    data. Dirichlet clients are uneven, so weighting by samples is what makes it
    equal, and the result does not depend on how many ranks simulate the clients."""
    fedsgd = BASE.replace(fraction=1.0, local_epochs=1, local_batch=None, partition="dirichlet", alpha=0.3)
    sizes = [len(p) for p in partition.of_config(fedsgd)[1]]
    assert max(sizes) > 3 * min(sizes) and sum(sizes) == DIGITS
    three = train(runs_dir, fedsgd)
    two = train(runs_dir, fedsgd.replace(world_size=2))
    single = train(runs_dir, RunConfig(strategy="single", world_size=1, hidden=16, lr=0.1, batch_size=DIGITS, steps=4,
                                       device="cpu"))  # fmt: skip
    mine, reference = three.result().state_dict, single.result().state_dict
    assert max_difference(mine, reference) < 1e-5
    assert max_difference(mine, two.result().state_dict) < 1e-6
    rounds = of_type(three, "round")
    assert [r["completed"] for r in rounds] == [12] * 4 and [r["samples"] for r in rounds] == [DIGITS] * 4
    clients = of_type(three, "client")
    assert len(clients) == 12 * 4 and all(c["local_steps"] == 1 for c in clients)
    assert {c["rank"] for c in clients} == {1, 2}  # the client ranks report their clients, the server does not
    # the loss the server logs per round is the clients' loss weighted by their samples: the full-batch loss
    assert abs(three.metrics["loss"].iloc[0] - single.metrics["loss"].iloc[0]) < 1e-5


def test_the_server_weights_client_updates_by_their_samples():
    """Rows are [samples * update, samples]: the update is the sample-weighted
    mean, in any arrival order; with DP the sum gets noise and is divided by the
    expected number of clients instead."""
    updates = {4: (torch.tensor([1.0, 0.0]), 10), 9: (torch.tensor([0.0, 1.0]), 30)}
    rows = {
        c: torch.cat([u.double() * n, torch.tensor([float(n)], dtype=torch.float64)]) for c, (u, n) in updates.items()
    }
    total = combine(rows, [], secure=False, size=2)
    assert server_update(BASE, total, round_=0, size=2).tolist() == [0.25, 0.75]  # not the unweighted [0.5, 0.5]
    assert torch.equal(combine(dict(reversed(list(rows.items()))), [], False, 2), total)
    noisy = BASE.replace(dp_noise_multiplier=1.0, fraction=0.5)  # 12 clients: 6 expected
    assert not torch.allclose(server_update(noisy, total, 0, 2), total[:2] / 6)
    assert torch.equal(server_update(noisy, total, 0, 2), server_update(noisy, total, 0, 2))  # seeded by round


def test_fedavg_with_one_client_is_single_on_its_data(runs_dir):
    """One client holding all the data, E=2 epochs of B=64 per round, 2 rounds:
    step for step what `single` does with batch 64 (its data order included)."""
    one = BASE.replace(world_size=2, clients=1, fraction=1.0, local_epochs=2, local_batch=64, rounds=2)
    steps = 2 * -(-2 * DIGITS // 64)
    fedavg = train(runs_dir, one)
    single = train(runs_dir, RunConfig(strategy="single", world_size=1, hidden=16, lr=0.1, batch_size=64,
                                       steps=steps, device="cpu", log_every=50))  # fmt: skip
    assert max_difference(fedavg.result().state_dict, single.result().state_dict) < 1e-5
    assert [c["local_steps"] for c in of_type(fedavg, "client")] == [steps // 2] * 2


def test_secure_aggregation_equals_plain_aggregation_with_dropouts(runs_dir):
    """Masks cancel exactly (fixed point, modulo 2^64), also when clients drop
    after the masks were agreed (the survivors reveal their masks with them)."""
    plain = once(runs_dir, "drops", DROPS)
    secure = train(runs_dir, DROPS.replace(secure_aggregation=True))
    assert max_difference(plain.result().state_dict, secure.result().state_dict) < 1e-6
    rounds = of_type(secure, "round")
    assert sum(r["dropped"] for r in rounds) > 0 and all(r["completed"] >= 2 for r in rounds)
    assert [r["bytes_up"] for r in rounds] == [2 * r["bytes_up"] for r in of_type(plain, "round")]  # int64 vs float32
    evals = of_type(plain, "eval")  # held-out evaluation: before the first round, every 2, after the last
    assert [e["step"] for e in evals] == [0, 2, 4] and evals[-1]["accuracy"] > evals[0]["accuracy"]
    assert {e["samples"] for e in evals} == {int(0.2 * DIGITS)}  # the held-out share, which no client holds
    assert sum(sum(row) for row in of_type(plain, "partition")[0]["counts"]) == DIGITS - evals[0]["samples"]


def test_a_client_rank_killed_mid_round_restarts_from_the_round_checkpoint(runs_dir):
    """Rank 1 is SIGKILLed after the server handed it round 3's clients. The
    attempt ends (nothing hangs), all ranks restart from round 2's checkpoint,
    redo rounds 2 and 3 exactly as before (every draw is seeded by round), and
    the run ends with the weights of an uninterrupted run."""
    clean = once(runs_dir, "drops", DROPS)
    fault = {"rank": 1, "step": 3, "kind": "sigkill"}
    killed = train(runs_dir, DROPS.replace(checkpoint_every=2, max_restarts=1, fault=fault))
    assert killed.status == "done"
    (restart,) = of_type(killed, "restart")
    assert restart["from_step"] == 2 and "rank 1" in restart["reason"]
    assert max_difference(clean.result().state_dict, killed.result().state_dict) == 0.0
    rounds = [(r["attempt"], r["round"]) for r in of_type(killed, "round")]
    assert rounds == [(0, 0), (0, 1), (0, 2), (1, 2), (1, 3)]
    assert [e["step"] for e in of_type(killed, "eval") if e["attempt"] == 1] == [2, 4]  # measured again on resume


def test_live_knobs_apply_at_a_round_boundary_and_the_round_says_so(runs_dir):
    cfg = BASE.replace(clients=20, fraction=0.1, rounds=100_000)
    run = ddlkit.launch(cfg.replace(run_dir=runs_dir), echo=False)
    deadline = time.time() + 60
    while run.steps_done < 3 and time.time() < deadline:
        time.sleep(0.05)
    with pytest.raises(ValueError, match=r"control fraction=0 is invalid: it must be a number in \(0, 1\]"):
        run.control(fraction=0)
    run.control(fraction=0.5, local_epochs=2)
    while not any("knobs" in e for e in of_type(run, "round")) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    run.stop()
    rounds = of_type(run, "round")
    (changed,) = [r for r in rounds if "knobs" in r]
    assert changed["knobs"] == {"fraction": 0.5, "local_epochs": 2}
    (control,) = [e for e in of_type(run, "control") if "knobs" in e]
    assert control["step"] == changed["round"]  # the control event marks the round it took effect
    before = [r for r in rounds if r["round"] < changed["round"]]
    after = [r for r in rounds if r["round"] >= changed["round"]]
    assert {r["sampled"] for r in before} == {2} and {r["sampled"] for r in after} == {10}
    assert {r["local_epochs"] for r in after} == {2}
    assert run.status == "stopped"


def test_under_a_tight_deadline_fedavg_drops_slow_clients_and_fedprox_takes_their_partial_work(runs_dir):
    cfg = BASE.replace(clients=20, fraction=0.5, local_epochs=3, devices="edge", deadline_s=0.6, rounds=3)
    fedavg = train(runs_dir, cfg)
    fedprox = train(runs_dir, cfg.replace(algorithm="fedprox", mu=0.1))
    avg_clients, prox_clients = of_type(fedavg, "client"), of_type(fedprox, "client")
    assert any(c["reason"] == "deadline" for c in avg_clients) and not any(c["partial"] for c in avg_clients)
    partial = [c for c in prox_clients if c["partial"]]
    assert partial and all(0 < c["local_steps"] and c["reason"] == "partial" for c in partial)
    assert sum(r["completed"] for r in of_type(fedprox, "round")) > sum(
        r["completed"] for r in of_type(fedavg, "round")
    )
    for run in (fedavg, fedprox):  # simulated time: no round waits past the deadline
        assert all(0 < r["sim_s"] <= 0.6 for r in of_type(run, "round"))


def test_dp_fedavg_reports_growing_epsilon_and_scaffold_and_server_optimizers_learn(runs_dir):
    dp = train(runs_dir, BASE.replace(fraction=0.5, dp_noise_multiplier=1.0, dp_clip=0.5, rounds=3))
    epsilons = [r["epsilon"] for r in of_type(dp, "round")]
    assert 0 < epsilons[0] < epsilons[1] < epsilons[2]
    assert all(c["update_norm"] > 0 for c in of_type(dp, "client"))
    for changes in ({"algorithm": "scaffold"}, {"server_optimizer": "fedadam", "server_lr": 0.01}):
        run = train(runs_dir, BASE.replace(fraction=0.5, local_epochs=2, rounds=5, eval_every=5, **changes))
        first, last = of_type(run, "eval")[0], of_type(run, "eval")[-1]
        assert last["accuracy"] > first["accuracy"] + 0.1, changes


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"fraction": 0.0}, r"fraction=0.0 is invalid: it must be a number in \(0, 1\]"),
        ({"fraction": 1.5}, r"fraction=1.5 is invalid: it must be a number in \(0, 1\]"),
        ({"clients": 1}, r"clients=1 is invalid with world_size=3: .* valid: clients >= 2"),
        ({"partition": "dirichlet", "alpha": 0.0}, r"alpha=0.0 is invalid: it must be a number > 0"),
        ({"algorithm": "fedprox", "mu": -0.1}, r"mu=-0.1 is invalid: it must be a number >= 0"),
        ({"partition": "shards", "clients": 7}, r"shards do not divide: .* 14 shards must be a multiple of the 10"),
        ({"partition": "shards", "shards_per_client": 11}, r"shards_per_client=11 is invalid: .* 1..10"),
        ({"dataset": "regression", "partition": "dirichlet"}, r"partition='dirichlet' is invalid for dataset="),
        ({"world_size": 1}, r"world_size=1 is invalid for strategy='federated'"),
        ({"mu": 0.1}, r"mu=0.1 is invalid with algorithm='fedavg': only fedprox reads it"),
        ({"algorithm": "scaffold", "secure_aggregation": True}, r"algorithm='scaffold' is invalid with secure"),
        ({"fault": {"rank": 1, "step": 4, "kind": "exit"}}, r"fault step=4 is invalid: .* rounds 0..3"),
        ({"clients": 5000}, r"clients=5000 is invalid: there are only 1797 training samples"),
    ],
)
def test_bad_input_is_one_clear_error_before_launch(runs_dir, changes, message):
    with pytest.raises(ValueError, match=message):
        ddlkit.launch(BASE.replace(run_dir=runs_dir, **changes), echo=False)
