"""Federated panels and tables, from events (no processes): what the dashboard
draws for round, eval, client and partition events, pinned on the figure
object (titles, axes, stacking, markers, the heatmap's shape); partitions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ddlkit
from ddlkit import partition
from ddlkit.kernel.run import Run
from ddlkit.view import federated
from ddlkit.view.panels import active_panels
from ddlkit.view.rundata import RunData


def round_event(r: int, attempt: int = 0, **extra) -> dict:
    return {"type": "round", "rank": 0, "time": 10.0 + r, "attempt": attempt, "round": r, "sampled": 10,
            "completed": 8, "partial": 2, "dropped": 2, "samples": 100, "update_norm": 1.0, "bytes_down": 2_000_000,
            "bytes_up": 1_000_000, "sim_s": 1.0, "sim_total_s": r + 1.0, "wall_s": 0.05, "fraction": 0.1,
            "local_epochs": 1, "mu": 0.0, **extra}  # fmt: skip


def federated_run(run_id: str = "a") -> Run:
    counts = [[5, 0, 3], [0, 7, 0], [1, 1, 1], [0, 0, 9]]
    events = [{"type": "partition", "rank": 0, "time": 9.0, "partition": "shards", "labels": [0, 1, 2],
               "counts": counts}]  # fmt: skip
    events += [round_event(r) for r in range(4)]
    events += [round_event(2, attempt=1, dropped=5, completed=5, partial=0), round_event(3, attempt=1)]  # redone
    events[-1]["knobs"] = {"fraction": 0.5}
    events += [{"type": "eval", "rank": 0, "time": 10.0 + r, "step": r, "loss": 1.0, "accuracy": 0.2 * r,
                "samples": 30} for r in range(5)]  # fmt: skip
    events += [{"type": "step", "rank": 0, "step": r, "time": 10.0 + r, "loss": 2.0 - 0.1 * r, "samples": 100,
                "step_time": 0.05, "compute_s": 0.01, "comm_s": 0.04, "wait_s": 0.0} for r in range(4)]  # fmt: skip
    return Run.from_events(events, started=0.0, run_id=run_id)


def test_a_federated_run_gets_its_four_panels_with_titles_and_axes():
    run = federated_run()
    keys = [panel.key for panel in active_panels([RunData(run)])]
    assert keys[-4:] == ["accuracy", "participation", "bytes", "labels"]
    fig = ddlkit.figures.figure(run, keys=["accuracy", "participation", "bytes", "labels"])
    titles = [a.text for a in fig.layout.annotations]
    assert titles == [
        "held-out accuracy (▼ live knob applied)",
        "clients per round: whole / partial / dropped",
        "MB per round: down (solid) / up (dotted)",
        "training samples per client and label",
    ]
    assert fig.layout.xaxis.title.text == "steps / rounds done" and fig.layout.yaxis.title.text == "accuracy"
    assert fig.layout.xaxis4.title.text == "client" and fig.layout.yaxis4.title.text == "label"
    (heatmap,) = [t for t in fig.data if t.type == "heatmap"]
    assert np.array(heatmap.z).shape == (3, 4)  # labels up, clients across


def test_panels_keep_the_latest_attempt_of_a_redone_round_and_stack_participation():
    fig = federated.figure({"restarted": federated_run()})
    whole, partial, dropped = [t for t in fig.data if t.type == "bar"]
    assert list(whole.x) == [0, 1, 2, 3]
    assert list(dropped.y) == [2, 2, 5, 2]  # round 2 from attempt 1
    assert list(partial.base) == list(whole.y) and list(dropped.base) == [8, 8, 5, 8]  # stacked
    down, up = [t for t in fig.data if t.type == "scatter" and t.line.dash in ("solid", "dot")]
    assert list(down.y) == [2.0] * 4 and list(up.y) == [1.0] * 4
    accuracy, knobs = fig.data[0], fig.data[1]
    assert accuracy.name == "accuracy" and list(accuracy.y) == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8])
    assert list(knobs.x) == [3] and list(knobs.text) == ["fraction=0.5"] and knobs.marker.symbol == "triangle-down"
    assert fig.layout.height == 720


def test_runs_overlay_in_the_accuracy_panel_with_their_names():
    fig = federated.figure({"FedAvg": federated_run("a"), "FedSGD": federated_run("b")})
    lines = [t for t in fig.data if t.type == "scatter" and t.mode == "lines+markers"]
    assert [t.name for t in lines] == ["FedAvg accuracy", "FedSGD accuracy"]
    assert lines[0].line.color != lines[1].line.color


def test_tables_and_rounds_to_target():
    run = federated_run()
    table = federated.rounds_table(run)
    assert table["round"].tolist() == [0, 1, 2, 3] and table.loc[2, "dropped"] == 5
    assert federated.rounds_to(run, 0.5) == 3 and federated.rounds_to(run, 0.99) is None
    assert federated.label_counts(run).sum() == 27


@pytest.mark.parametrize("kind", partition.KINDS)
def test_every_sample_belongs_to_exactly_one_client(kind):
    labels = torch.arange(1000) % 10
    parts = partition.split(labels, clients=50, kind=kind, alpha=0.1, shards_per_client=2, seed=3)
    joined = torch.cat(parts)
    assert len(joined) == 1000 and sorted(joined.tolist()) == list(range(1000))
    assert all(len(p) > 0 for p in parts)
    assert parts[0].tolist() == partition.split(labels, 50, kind, 0.1, 2, seed=3)[0].tolist()  # seeded


def test_small_alpha_is_more_skewed_than_large_and_shards_give_exactly_k_labels():
    labels = torch.arange(2000) % 10
    skews = {
        alpha: partition.skew(partition.label_table(labels, partition.split(labels, 20, "dirichlet", alpha, seed=0)))
        for alpha in (0.05, 1.0, 100.0)
    }
    assert skews[0.05] > 0.7 > skews[1.0] > 0.2 > skews[100.0]
    for per_client in (1, 2, 5):
        parts = partition.split(labels, 20, "shards", shards_per_client=per_client, seed=0)
        table = partition.label_table(labels, parts)
        assert (np.count_nonzero(table, axis=1) == per_client).all()


def test_the_control_panel_wraps_the_federated_knobs_and_counts_rounds():
    panel = ddlkit.ControlPanel(ddlkit.RunConfig(strategy="federated", world_size=3, rounds=40, device="cpu"))
    shown = [widget.description for widget in panel.knob_box.children]
    assert panel.knob_box.layout.flex_flow == "row wrap"  # ~20 knobs in rows, not one line 4,000 px wide
    assert {"clients", "fraction C", "rounds", "local epochs E", "local batch B (0: all)", "algorithm", "mu (fedprox)",
            "server optimizer", "partition", "alpha (dirichlet)", "devices", "deadline s (0: none)", "dropout",
            "secure aggregation", "DP noise multiplier", "DP clip"} <= set(shown)  # fmt: skip
    panel.fields["local_batch"].value = 0  # the widget's 0 is None: the whole client data (FedSGD)
    assert panel.config().local_batch is None and panel.check() is None
    panel.fields["clients"].value = 1
    assert "clients=1 is invalid with world_size=3" in panel.status.value and panel.run_button.disabled
    assert ddlkit.registry.get("federated").length(panel.config()) == 40  # the progress bar ends at the last round
