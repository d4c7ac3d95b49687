"""Every pipeline schedule torch 2.13 ships (strategies/schedules.py): each
one's layout refused before launch when it cannot run, each exact against one
process, and the stage methods the spans time pinned to the torch they were
written for."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch.distributed.pipelining import PipelineStage

import ddlkit
from ddlkit import timeline
from ddlkit.strategies.schedules import SCHEDULES, stage_ids

from .test_model_parallel import _cfg, _single_state, _train, _worst_difference  # the same runs and reference


def test_every_schedule_torch_ships_is_offered():
    import torch.distributed.pipelining as pipelining

    shipped = {name for name in pipelining.__all__ if name.startswith("Schedule")}
    assert {spec.cls.__name__ for spec in SCHEDULES.values()} == shipped


def test_the_stage_methods_timed_are_the_ones_torch_2_13_calls():
    """TimedStage overrides three undocumented PipelineStage methods. Written
    for torch 2.13: on another version re-read schedules.py's runtime (which
    methods it calls, with which arguments) and update TimedStage and this pin."""
    assert torch.__version__.startswith("2.13."), (
        f"torch {torch.__version__}: TimedStage (ddlkit/strategies/schedules.py) was written for torch 2.13's "
        "PipelineStage.forward_one_chunk/backward_one_chunk/backward_weight_one_chunk; check them and update"
    )
    signatures = {
        name: list(inspect.signature(getattr(PipelineStage, name)).parameters)
        for name in ("forward_one_chunk", "backward_one_chunk", "backward_weight_one_chunk")
    }
    assert signatures == {
        "forward_one_chunk": ["self", "fwd_chunk_id", "args", "kwargs", "save_forward_output"],
        "backward_one_chunk": ["self", "bwd_chunk_id", "loss", "full_backward", "last_backward"],
        "backward_weight_one_chunk": ["self", "bwd_chunk_id", "last_backward"],
    }


def test_stages_are_placed_looped_or_in_a_v():
    assert [stage_ids(r, 2, "interleaved_zb") for r in range(2)] == [[0, 2], [1, 3]]
    assert [stage_ids(r, 3, "zbv") for r in range(3)] == [[0, 5], [1, 4], [2, 3]]
    assert [stage_ids(r, 2, "1f1b") for r in range(2)] == [[0], [1]]


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(world_size=4, pp=4, schedule="zbv"), "needs 8 stages \\(2 per rank\\) but model='mlp' has only 5"),
        (dict(world_size=4, pp=4, schedule="looped_bfs", model="lm", dataset="sonnets"), "valid pp for it is 2..2"),
        (dict(world_size=2, pp=2, schedule="dualpipev", micro_batches=2), "at least as many micro-batches as its 4"),
        (
            dict(world_size=4, pp=4, schedule="interleaved_zb", model="cnn", micro_batches=6, batch_size=12),
            "must be a multiple of pp",
        ),
        (dict(world_size=2, pp=2, schedule="zbv", micro_batches=1), "at least as many micro-batches as stages"),
        (dict(world_size=2, pp=2, stage_costs=[1, 1]), "stage_costs=\\[1, 1\\] is invalid"),
        (dict(world_size=2, pp=2, stage_costs=[0, 1, 1]), "F above 0"),
        (dict(world_size=2, pp=2, schedule="zb"), "did you mean"),
        # torch's split backward gets the weight gradients behind a parameter-free first stage wrong
        (dict(world_size=2, pp=2, schedule="zbv", model="cnn", cut_points=[1, 4, 8]), "no cut at \\[1, 7\\]"),
        (dict(world_size=4, pp=4, schedule="zbv", model="cnn", cut_points=[2, 3, 4, 5, 6, 7, 8]), "no cut at"),
    ],
)
def test_layouts_a_schedule_cannot_run_are_refused_before_launch(runs_dir, no_leftovers, changes, message):
    with pytest.raises(ValueError, match=message):
        ddlkit.launch(_cfg(runs_dir, strategy="pipeline", **changes), echo=False)
    assert no_leftovers == []


def test_the_layers_that_return_views_are_known():
    from ddlkit.data import load_dataset
    from ddlkit.models import build_model
    from ddlkit.strategies.schedules import VIEW_LAYERS
    from ddlkit.strategies.stages import pipeline_layers

    for model, dataset in (("mlp", "digits"), ("cnn", "digits"), ("lm", "sonnets")):
        data = load_dataset(dataset, seq_len=16)
        x, views = data.inputs[:2], []
        layers = pipeline_layers(build_model(model, data, 32, 16))
        for i, layer in enumerate(layers[:-1]):  # the last layer's output goes to the loss, not to a stage
            x = layer(x.detach().requires_grad_() if x.is_floating_point() else x)
            if x._base is not None:  # a view of its input
                views.append(i)
        assert tuple(views) == VIEW_LAYERS[model], model


def test_every_valid_layout_passes_validation(runs_dir):
    """The rules are not over-eager: each schedule at p=2 (mlp, m=4) and p=4 (cnn, m=8)."""
    for schedule in SCHEDULES:
        _cfg(runs_dir, strategy="pipeline", world_size=2, pp=2, micro_batches=4, schedule=schedule).validate()
        _cfg(
            runs_dir, strategy="pipeline", world_size=4, pp=4, micro_batches=8, schedule=schedule, model="cnn"
        ).validate()


LM = dict(model="lm", dataset="sonnets", seq_len=16)


@pytest.mark.parametrize(
    "layout",
    [
        # p=2 (gpipe, 1f1b and interleaved: tests/test_model_parallel.py)
        dict(pp=2, world_size=2, micro_batches=4, schedule="looped_bfs"),
        dict(pp=2, world_size=2, micro_batches=4, schedule="interleaved_zb"),
        dict(pp=2, world_size=2, micro_batches=4, schedule="zbv", **LM),
        dict(pp=2, world_size=2, micro_batches=4, schedule="dualpipev"),
        dict(pp=2, world_size=2, micro_batches=4, schedule="interleaved_zb", model="cnn"),  # cut past the reshape
        # p=4: the lm has 4 pipeline layers, enough for one stage per rank; two per rank take the cnn's 10
        dict(pp=4, world_size=4, micro_batches=4, schedule="1f1b", **LM),
        dict(pp=4, world_size=4, micro_batches=8, schedule="zbv", model="cnn", batch_size=8),
        dict(pp=4, world_size=4, micro_batches=8, schedule="dualpipev", model="cnn", batch_size=8),
        # dp x pp: two replicas of a V pipeline, 8 samples each = one process on 16
        dict(strategy="hybrid", dp=2, pp=2, world_size=4, micro_batches=4, batch_size=8, schedule="zbv"),
    ],
)
def test_every_schedule_equals_the_single_process_model(runs_dir, layout):
    run = _train(runs_dir, **{"strategy": "pipeline", **layout})
    reference = {k: v for k, v in layout.items() if k in ("model", "dataset", "seq_len", "batch_size")}
    if layout.get("strategy") == "hybrid":
        reference["batch_size"] = layout["batch_size"] * layout["dp"]
    single = _single_state(runs_dir, **reference)
    assert _worst_difference(run.result().state_dict, single) < 1e-5
    start = _single_state(runs_dir, steps=1, **reference)
    assert _worst_difference(start, single) > 1e-4  # the steps moved the weights: agreement means something
    # the zero-bubble schedules time I and W apart; DualPipeV also pairs an F with a whole B in its steady state
    splits = SCHEDULES[layout["schedule"]].splits_backward
    expected = {"forward", "input", "weight"} if splits else {"forward", "backward"}
    assert set(timeline.spans(run)["phase"]) == expected | (
        {"backward"} if layout["schedule"] == "dualpipev" else set()
    )


@pytest.mark.parametrize("schedule", ["1f1b", "interleaved", "looped_bfs", "interleaved_zb", "zbv", "dualpipev"])
def test_measured_bubble_is_within_0_03_of_the_schedules_theory(runs_dir, schedule):
    """Teaching mode: F, I and W each sleep 50 ms (stage_costs [1, 1, 1]; at
    20-30 ms other processes' load on 2 shared cores shows), p=2, m=4. GPipe:
    tests/test_model_parallel.py. Each zero-bubble schedule's theory, and its
    measured bubble, is below 1F1B's (1/5)."""
    run = _train(
        runs_dir,
        strategy="pipeline",
        world_size=2,
        pp=2,
        micro_batches=4,
        schedule=schedule,
        stage_delay=0.05,
        stage_costs=[1, 1, 1],
        steps=4,
    )
    table = timeline.bubbles(run)
    assert (table["schedule"] == schedule).all() and len(table) == 2
    v = SCHEDULES[schedule].stages_per_rank
    expected = timeline.theory(schedule, 2, 4, v, *table[["F", "B", "W"]].iloc[0])
    assert table["theory"].iloc[0] == pytest.approx(expected)
    measured = timeline.bubble_fraction(run)
    assert abs(measured - expected) < 0.03, table
    if SCHEDULES[schedule].splits_backward:
        assert measured < timeline.theory("1f1b", 2, 4) - 0.05, table


def test_stage_costs_set_forward_input_and_weight_apart(runs_dir):
    """F costs 2 units, I and W one each: the spans' medians show it, and the
    theory (ZB1P: (p-1)(F+B-W) = 2 units idle of 2+4*2*4) follows them."""
    delay = 0.04
    run = _train(
        runs_dir,
        strategy="pipeline",
        world_size=2,
        pp=2,
        micro_batches=4,
        schedule="interleaved_zb",
        stage_delay=delay,
        stage_costs=[2, 1, 1],
        steps=4,
    )
    table = timeline.bubbles(run)
    times = table[["F", "B", "W"]].iloc[0] / delay
    assert times["F"] == pytest.approx(2, abs=0.3) and times["B"] == pytest.approx(1, abs=0.3), times
    assert times["W"] == pytest.approx(1, abs=0.3), times
    assert table["theory"].iloc[0] == pytest.approx(2 / (2 + 32), abs=0.01)
    assert abs(timeline.bubble_fraction(run) - table["theory"].iloc[0]) < 0.03, table


def test_the_gantt_colours_forward_input_and_weight_apart():
    """A split backward's halves get bars (and legend entries) of their own
    colours; a schedule that does not split keeps forward and backward."""
    from ddlkit.kernel.run import Run

    def span(stage, mb, phase, start):
        return dict(
            type="span", rank=stage, step=0, stage=stage, micro_batch=mb, phase=phase, start=start, end=start + 1
        )

    split = Run.from_events([span(0, 0, "forward", 0), span(0, 0, "input", 2), span(0, 0, "weight", 3)])
    fig = timeline.figure(split)
    assert [t.name for t in fig.data] == ["forward", "input grad", "weight grad"]
    assert len({t.marker.color for t in fig.data}) == 3
    assert [list(t.base) for t in fig.data] == [[0], [2], [3]]
    whole = Run.from_events([span(0, 0, "forward", 0), span(0, 0, "backward", 2)])
    assert [t.name for t in timeline.figure(whole).data] == ["forward", "backward"]
