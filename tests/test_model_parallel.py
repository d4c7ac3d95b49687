"""Model parallelism (pipeline, tensor, fsdp, hybrids) on CPU processes over gloo:
exact against one process, the pipeline's bubble and activation memory, FSDP's
memory per rank, and the layouts refused before launch."""
from __future__ import annotations

import pytest

import ddlkit
from ddlkit import RunConfig

SINGLE = dict(strategy="single", world_size=1)


def _cfg(runs_dir, **changes) -> RunConfig:
    return RunConfig(model="mlp", dataset="digits", steps=4, batch_size=16, lr=0.1, optimizer="sgd", seed=0,
                     device="cpu", run_dir=runs_dir, hang_timeout=60, hidden=32).replace(**changes)


def _train(runs_dir, **changes):
    return ddlkit.launch(_cfg(runs_dir, **changes), echo=False).wait(timeout=180)


def _worst_difference(a: dict, b: dict) -> float:
    assert list(a) == list(b)  # the same names, in the same order, as the single-process model
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("layout, single_batch", [
    (dict(strategy="pipeline", world_size=2, pp=2, micro_batches=4, schedule="gpipe"), 16),
    (dict(strategy="pipeline", world_size=2, pp=2, micro_batches=4, schedule="1f1b", model="lm",
          dataset="sonnets", seq_len=16), 16),
    (dict(strategy="pipeline", world_size=2, pp=2, micro_batches=4, schedule="interleaved", cut_points=[1, 2, 4]), 16),
    (dict(strategy="tensor", world_size=2, tp=2), 16),
    (dict(strategy="tensor", world_size=2, tp=2, model="lm", dataset="sonnets", seq_len=16), 16),
    (dict(strategy="fsdp", world_size=2, optimizer="adam", lr=3e-3), 32),
])
def test_parameters_equal_the_single_process_model(runs_dir, layout, single_batch):
    """After a few optimizer steps on the same global batch the weights agree
    to float32 rounding (data-parallel forms: N ranks of batch B = one of N*B).
    SGD: Adam's first steps are about lr * sign(gradient), which turns rounding
    differences in near-zero gradients into lr-sized ones."""
    run = _train(runs_dir, **layout)
    reference = {k: v for k, v in layout.items() if k in ("model", "dataset", "optimizer", "lr", "seq_len")}
    single = _train(runs_dir, **SINGLE, **reference, batch_size=single_batch).result().state_dict
    assert _worst_difference(run.result().state_dict, single) < 1e-5
    start = _train(runs_dir, **SINGLE, **reference, batch_size=single_batch, steps=1).result().state_dict
    assert _worst_difference(start, single) > 1e-4  # the steps moved the weights: agreement means something
