"""Emulated networks (ddlkit.network, ddlkit.rank.emulated): one process-group
backend adds the alpha-beta model's time to every collective and message of
every strategy, counted exactly, changeable live."""

from __future__ import annotations

import time

import pytest

import ddlkit
from ddlkit import RunConfig, network
from ddlkit.network import allreduce_seconds, link_of, op_seconds

SLOW = {"latency_ms": 20.0, "bandwidth_gbps": 0.05}  # 20 ms a message, 6.25 MB/s: the model dominates loopback


def _wait_until(condition, timeout):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _train(runs_dir, **changes):
    cfg = RunConfig(
        model="mlp", dataset="digits", steps=10, lr=0.1, seed=0, device="cpu", run_dir=runs_dir, hang_timeout=60
    ).replace(**changes)
    return ddlkit.launch(cfg, echo=False).wait(timeout=150)


def test_the_model_follows_the_algorithms():
    link = link_of({"latency_ms": 1.0, "bandwidth_gbps": 8.0})  # 1 ms, 1 GB/s
    mb = 1_000_000
    assert allreduce_seconds(mb, 4, link) == pytest.approx(6 * 1e-3 + 1.5 * 1e-3)  # 2(n-1) messages, 2(n-1)/n bytes
    assert op_seconds("allgather", mb, 4, link) == pytest.approx(3e-3 + 3e-3)  # receives the other 3 parts
    assert op_seconds("reduce_scatter", 4 * mb, 4, link) == pytest.approx(3e-3 + 3e-3)  # (n-1)/n of the full buffer
    assert op_seconds("send", mb, 4, link) == pytest.approx(1e-3 + 1e-3)
    assert op_seconds("recv", mb, 4, link) == 0  # the sender paid
    assert op_seconds("allreduce", mb, 1, link) == 0 and op_seconds("allreduce", mb, 8, None) == 0  # alone; loopback
    assert [name for name, link in network.PRESETS.items() if link is None] == ["loopback"]
    speeds = [network.PRESETS[name].bandwidth_gbps for name in ("nvlink", "infiniband", "10gbe", "1gbe", "wan")]
    assert speeds == sorted(speeds, reverse=True)


@pytest.mark.parametrize(
    "bad, words",
    [
        (dict(network="5g"), "network='5g' is invalid: valid values are"),
        (dict(network={"latency_ms": -1, "bandwidth_gbps": 1}), "latency_ms=-1 is invalid"),
        (dict(network={"latency_ms": 1, "bandwidth_gbps": 0}), "bandwidth_gbps=0 is invalid"),
        (dict(network={"latency_ms": 1}), "network={'latency_ms': 1} is invalid"),
    ],
)
def test_bad_networks_are_refused_before_launch(runs_dir, bad, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace("[", r"\[").replace("{", r"\{")):
        ddlkit.launch(RunConfig(strategy="data", world_size=2, run_dir=runs_dir, **bad))


def test_a_slow_network_adds_the_modelled_time_to_each_all_reduce(runs_dir):
    """2 ranks of ``data``: every step's modelled seconds are exactly the model's for the
    all-reduced bytes, and the comm time measured around DDP's all-reduces is within 15 %
    of it (the model dominates loopback here)."""
    run = _train(runs_dir, strategy="data", world_size=2, batch_size=16, network=SLOW)
    gradient_bytes = sum(p.numel() * 4 for p in run.result().state_dict.values())
    # from the third step on (DDP's second backward also broadcasts its rebuilt bucket order: 32 bytes)
    steps = run.metrics[run.metrics["step"] >= 2]
    assert (steps["comm_bytes"] == gradient_bytes).all()  # one all-reduce of the whole gradient, per rank
    expected = allreduce_seconds(gradient_bytes, 2, link_of(SLOW))
    assert steps["network_s"].to_numpy() == pytest.approx(expected, rel=1e-9)  # exact, every step and rank
    comm = next(e for e in run.events if e["type"] == "comm")
    assert comm["wire_bytes"] == gradient_bytes + 32  # 2(n-1)/n = 1 at n=2, and that broadcast
    measured = steps["comm_s"].median()
    assert measured == pytest.approx(expected, rel=0.15), (measured, expected)
    loopback = _train(runs_dir, strategy="data", world_size=2, batch_size=16, steps=6)
    assert (loopback.metrics["network_s"] == 0).all() and loopback.metrics["comm_s"].median() < measured / 3


def test_the_network_changes_live_at_the_same_step_on_every_rank(runs_dir):
    cfg = RunConfig(
        strategy="data", world_size=2, steps=4000, batch_size=16, device="cpu", run_dir=runs_dir, hang_timeout=60
    )
    run = ddlkit.launch(cfg, echo=False)
    try:
        _wait_until(lambda: run.steps_done >= 20, 60)
        with pytest.raises(ValueError, match="control network='dialup' is invalid"):
            run.control(network="dialup")
        run.control(network=SLOW)
        _wait_until(lambda: any(e["type"] == "control" and "network" in e for e in run.events), 60)
        switched = next(e["step"] for e in run.events if e["type"] == "control" and "network" in e)
        _wait_until(lambda: run.steps_done >= switched + 5, 30)
    finally:
        run.stop()
    run.wait(timeout=60)
    applied = next(e for e in run.events if e["type"] == "control" and "network" in e)
    assert applied["network"] == SLOW
    table = run.metrics
    before, after = table[table["step"] < applied["step"]], table[table["step"] >= applied["step"]]
    assert (before["network_s"] == 0).all()
    assert len(after) >= 2 and (after["network_s"] > 0.04).all()  # both ranks, from that very step


@pytest.mark.parametrize(
    "layout",
    [
        dict(strategy="fsdp", world_size=2),
        dict(strategy="tensor", world_size=2, tp=2),
        dict(strategy="pipeline", world_size=2, pp=2, micro_batches=2),
        dict(strategy="ps", world_size=3, sync="bsp"),
        dict(strategy="local_sgd", world_size=2, sync_every=2),
    ],
)
def test_every_strategy_goes_through_the_emulated_network(runs_dir, layout):
    """No strategy knows: the same backend delays and counts their collectives and messages."""
    link = {"latency_ms": 2.0, "bandwidth_gbps": 1.0}
    run = _train(runs_dir, steps=4, batch_size=8, network=link, **layout)
    finished = [e for e in run.events if e["type"] == "finished"]
    assert len(finished) == layout["world_size"]
    for event in finished:
        assert event["wire_bytes"] > 0
        assert event["network_s"] >= 2e-3  # at least one latency for each rank
    comm = [e for e in run.events if e["type"] == "comm" and e["comm_bytes"] > 0]
    assert comm and all(e["network_s"] > 0 for e in comm)


def test_the_network_panel_shows_measured_comm_beside_the_model():
    from ddlkit.kernel.run import Run
    from ddlkit.view import panels
    from ddlkit.view.rundata import RunData

    def rows(network_s):
        return [
            {"type": "step", "rank": r, "step": s, "time": 1.0 + s, "loss": 1.0, "samples": 8, "step_time": 0.02,
             "compute_s": 0.005, "comm_s": 0.015, "wait_s": 0.0, "network_s": network_s}
            for s in range(3) for r in (0, 1)
        ]  # fmt: skip

    loopback, slow = RunData(Run.from_events(rows(0.0))), RunData(Run.from_events(rows(0.012)))
    for data in (loopback, slow):
        data.update()
    assert "network" not in [p.key for p in panels.active_panels([loopback])]  # nothing emulated: no panel
    panel = next(p for p in panels.active_panels([slow]) if p.key == "network")
    measured, model = panel.traces([slow], panels.Context())
    assert list(measured["y"]) == pytest.approx([15.0] * 3) and list(model["y"]) == pytest.approx([12.0] * 3)  # ms
    assert model["line"]["dash"] == "dot" and panel.y_title == "ms"


def test_the_control_panel_sets_the_network_before_a_run():
    panel = ddlkit.ControlPanel(RunConfig(network={"latency_ms": 1.0, "bandwidth_gbps": 2.0}))
    assert panel.network.value == {"latency_ms": 1.0, "bandwidth_gbps": 2.0}  # the config's own, in the menu
    assert [label for label, _ in panel.network.options][:2] == ["loopback", "nvlink"]
    panel.network.value = "wan"
    assert panel.config().network == "wan" and panel.check() is None
