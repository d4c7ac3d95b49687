"""Model parallelism (pipeline, tensor, fsdp, hybrids) on CPU processes over gloo:
exact against one process, the pipeline's bubble and activation memory, FSDP's
memory per rank, and the layouts refused before launch."""

from __future__ import annotations

import pandas as pd
import pytest

import ddlkit
from ddlkit import RunConfig, timeline

SINGLE = dict(strategy="single", world_size=1)


def _cfg(runs_dir, **changes) -> RunConfig:
    return RunConfig(
        model="mlp",
        dataset="digits",
        steps=4,
        batch_size=16,
        lr=0.1,
        optimizer="sgd",
        seed=0,
        device="cpu",
        run_dir=runs_dir,
        hang_timeout=60,
        hidden=32,
    ).replace(**changes)


def _train(runs_dir, **changes):
    return ddlkit.launch(_cfg(runs_dir, **changes), echo=False).wait(timeout=180)


def _worst_difference(a: dict, b: dict) -> float:
    assert list(a) == list(b)  # the same names, in the same order, as the single-process model
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize(
    "layout, single_batch",
    [
        (dict(strategy="pipeline", world_size=2, pp=2, micro_batches=4, schedule="gpipe"), 16),
        (
            dict(
                strategy="pipeline",
                world_size=2,
                pp=2,
                micro_batches=4,
                schedule="1f1b",
                model="lm",
                dataset="sonnets",
                seq_len=16,
            ),
            16,
        ),
        (
            dict(
                strategy="pipeline", world_size=2, pp=2, micro_batches=4, schedule="interleaved", cut_points=[1, 2, 4]
            ),
            16,
        ),
        # Stages of parameter-free layers only (the mlp's 4th stage is a ReLU; the cnn's first a reshape).
        (dict(strategy="pipeline", world_size=4, pp=4, micro_batches=4), 16),
        (dict(strategy="pipeline", world_size=2, pp=2, micro_batches=4, model="cnn", cut_points=[1]), 16),
        (dict(strategy="tensor", world_size=2, tp=2), 16),
        (dict(strategy="tensor", world_size=2, tp=2, model="lm", dataset="sonnets", seq_len=16), 16),
        (dict(strategy="fsdp", world_size=2, optimizer="adam", lr=3e-3), 32),
        (dict(strategy="hybrid", world_size=4, dp=2, pp=2, micro_batches=2, batch_size=8), 16),
        (dict(strategy="hybrid", world_size=4, dp=2, tp=2, batch_size=8), 16),
    ],
)
def test_parameters_equal_the_single_process_model(runs_dir, layout, single_batch):
    """After a few optimizer steps on the same global batch the weights agree
    to float32 rounding (data-parallel forms: N ranks of batch B = one of N*B).
    SGD: Adam's first steps are about lr * sign(gradient), which turns rounding
    differences in near-zero gradients into lr-sized ones."""
    run = _train(runs_dir, **layout)
    reference = {k: v for k, v in layout.items() if k in ("model", "dataset", "optimizer", "lr", "seq_len")}
    single = _single_state(runs_dir, batch_size=single_batch, **reference)
    assert _worst_difference(run.result().state_dict, single) < 1e-5
    start = _single_state(runs_dir, batch_size=single_batch, steps=1, **reference)
    assert _worst_difference(start, single) > 1e-4  # the steps moved the weights: agreement means something


_single_states: dict[frozenset, dict] = {}


def _single_state(runs_dir, **changes) -> dict:
    """The single-process reference, trained once per configuration (deterministic) for all layouts."""
    key = frozenset(changes.items())
    if key not in _single_states:
        _single_states[key] = _train(runs_dir, **SINGLE, **changes).result().state_dict
    return _single_states[key]


@pytest.mark.parametrize("micro_batches", [2, 4, 8])
def test_gpipe_bubble_matches_theory(runs_dir, micro_batches):
    """Two balanced stages (teaching mode: each forward sleeps 30 ms, each
    backward 60 ms, standing in for real work): the measured idle fraction is
    within 0.05 of (p-1)/(m+p-1)."""
    run = _train(
        runs_dir,
        strategy="pipeline",
        world_size=2,
        pp=2,
        schedule="gpipe",
        micro_batches=micro_batches,
        stage_delay=0.03,
        steps=4,
    )
    table = timeline.bubbles(run, warmup=1)
    assert table["theory"].iloc[0] == pytest.approx(1 / (micro_batches + 1))
    assert len(table) == 2
    assert abs(timeline.bubble_fraction(run) - 1 / (micro_batches + 1)) < 0.05, table
    spans = timeline.spans(run)
    assert len(spans) == 4 * 2 * micro_batches * 2  # steps x stages x micro-batches x (forward, backward)
    assert len(timeline.traces(run)) == 2
    assert len(timeline.figure(run).data) == 2
    # ... and the dashboard shows it as its pipeline panel (a data-parallel run has none)
    from ddlkit import figures

    assert "pipeline timeline, last 2 steps (gaps: bubble)" in [a.text for a in figures.figure(run).layout.annotations]


def test_1f1b_keeps_fewer_micro_batches_alive_than_gpipe(runs_dir):
    """GPipe runs every forward before any backward, so the first stage holds
    all m micro-batches' activations; 1F1B starts backwards after p forwards."""
    runs = {
        schedule: _train(
            runs_dir,
            strategy="pipeline",
            world_size=2,
            pp=2,
            schedule=schedule,
            micro_batches=8,
            batch_size=64,
            steps=2,
            hidden=256,
            cut_points=[2],
        )
        for schedule in ("gpipe", "1f1b")
    }
    alive = {s: timeline.in_flight(run).set_index("stage")["max_in_flight"] for s, run in runs.items()}
    assert alive["gpipe"][0] == 8 and alive["1f1b"][0] == 2
    # ... and so do the activation bytes autograd kept alive. Stage 0: ReLU
    # outputs of 8 vs 2 micro-batches, plus the whole input batch that both
    # keep (micro-batches are views of it): 80 KiB vs 32 KiB. Stage 1: 8 vs 1.
    memory = {s: timeline.memory_table(run).set_index("rank")["peak_activation_bytes"] for s, run in runs.items()}
    assert memory["gpipe"][0] > 2 * memory["1f1b"][0] and memory["gpipe"][1] > 6 * memory["1f1b"][1], memory


def test_fsdp_stores_a_shard_of_parameters_and_optimizer_state(runs_dir):
    """Measured from each rank's memory event, against DDP on the same model."""
    ddp = timeline.memory_table(_train(runs_dir, strategy="data", world_size=2, optimizer="adam", lr=3e-3))
    fsdp = timeline.memory_table(_train(runs_dir, strategy="fsdp", world_size=2, optimizer="adam", lr=3e-3))
    assert len(ddp) == len(fsdp) == 2
    for column in ("param_bytes", "grad_bytes", "optimizer_bytes"):
        ratio = fsdp[column] / ddp[column]
        assert ((ratio > 0.45) & (ratio < 0.55)).all(), (column, ratio.tolist())
    # Adam: two moments per parameter, plus a 4-byte step counter per tensor
    assert (ddp["optimizer_bytes"] - 2 * ddp["param_bytes"]).abs().lt(100).all()


def test_communication_is_counted_per_collective(runs_dir):
    """DDP all-reduces every gradient once: its payload is the parameter bytes.
    FSDP hands over its shard twice (all-gathers for forward and backward) and
    the full gradients once (reduce-scatter): twice as much. The pipeline only
    sends one boundary activation (and its gradient) per micro-batch."""
    runs = {
        s: _train(runs_dir, strategy=s, world_size=2, **extra)
        for s, extra in (("data", {}), ("fsdp", {}), ("pipeline", dict(pp=2, cut_points=[2])))
    }
    comm = {
        s: pd.DataFrame([e for e in run.events if e["type"] == "comm"]).set_index("rank")["comm_bytes"]
        for s, run in runs.items()
    }
    comm = {s: column.sort_index() for s, column in comm.items()}
    params = timeline.memory_table(runs["data"]).set_index("rank")["param_bytes"]
    # DDP adds a few bytes of bookkeeping collectives (32 bytes here)
    assert ((comm["data"] >= params) & (comm["data"] < params + 100)).all()
    assert ((comm["fsdp"] / params - 2).abs() < 0.05).all()
    # batch x hidden x float32 crosses the cut (stage 0 sends activations,
    # stage 1 their gradients), plus the 4-byte loss broadcast on both
    assert (comm["pipeline"] == 16 * 32 * 4 + 4).all()


def test_every_built_in_model_has_the_layers_validation_assumes():
    from ddlkit.data import load_dataset
    from ddlkit.models import build_model
    from ddlkit.strategies.stages import LAYERS, balanced_cuts, pipeline_layers

    for model, dataset in (("mlp", "digits"), ("cnn", "digits"), ("lm", "sonnets")):
        assert len(pipeline_layers(build_model(model, load_dataset(dataset), 32, 16))) == LAYERS[model]
    assert balanced_cuts([5, 5, 5, 5], 4) == [1, 2, 3]
    assert balanced_cuts([1, 1, 8, 1, 1, 4], 2) == [3]  # the largest stage as small as it can be: 10 | 6


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(strategy="hybrid", world_size=4, dp=2, pp=3), "must multiply to world_size"),
        (dict(strategy="hybrid", world_size=4, dp=1, pp=2, tp=2), "exactly one of pp or tp"),
        (dict(strategy="pipeline", world_size=2, pp=1), "pp must equal world_size"),
        (dict(strategy="tensor", world_size=2, tp=2, pp=2), "pp=2 is invalid for strategy='tensor': it is read by"),
        (dict(strategy="tensor", world_size=4, tp=2), "tp must equal world_size"),
        (dict(strategy="fsdp", world_size=1), "world_size >= 2"),
        (dict(strategy="pipeline", world_size=6, pp=6), "only 5 layers"),
        (
            dict(
                strategy="pipeline",
                world_size=2,
                pp=2,
                schedule="interleaved",
                model="lm",
                dataset="sonnets",
                world_size_=None,
            ),
            None,
        ),
        (dict(strategy="pipeline", world_size=4, pp=4, micro_batches=2), "at least as many micro-batches as stages"),
        (dict(strategy="pipeline", world_size=2, pp=2, micro_batches=3), "dividing batch_size"),
        (
            dict(strategy="pipeline", world_size=2, pp=2, schedule="interleaved", micro_batches=3, batch_size=12),
            "multiple of pp",
        ),
        (dict(strategy="pipeline", world_size=2, pp=2, cut_points=[5]), "cut_points"),
        (dict(strategy="pipeline", world_size=2, pp=2, schedule="zero-bubble"), "schedule="),
        (dict(strategy="tensor", world_size=2, tp=2, hidden=33), "hidden must be a multiple of tp"),
        (dict(strategy="tensor", world_size=3, tp=3, model="lm", dataset="sonnets", hidden=48), "attention heads"),
        (dict(strategy="pipeline", world_size=2, pp=2, stage_delay=-1), "stage_delay"),
        (dict(strategy="data", world_size=2, pp=2), "is read by \\['pipeline', 'hybrid'\\]"),
    ],
)
def test_impossible_layouts_are_refused_before_launch(runs_dir, no_leftovers, changes, message):
    changes = {k: v for k, v in changes.items() if not k.endswith("_")}
    if message is None:  # a layout that is fine: the check must not be over-eager
        _cfg(runs_dir, **changes).validate()
        return
    with pytest.raises(ValueError, match=message):  # a bad value already when set, a bad layout at launch
        ddlkit.launch(_cfg(runs_dir, **changes), echo=False)
    assert no_leftovers == []  # nothing was started
