"""Sending less and syncing less: gradient compression hooks, gradient
accumulation and local SGD / DiLoCo, each against its exact reference."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import ddlkit
from ddlkit import RunConfig
from ddlkit.strategies import compression


def _train(runs_dir, **changes):
    cfg = RunConfig(
        model="mlp", dataset="digits", steps=8, lr=0.1, seed=0, device="cpu", run_dir=runs_dir, hang_timeout=60
    ).replace(**changes)
    return ddlkit.launch(cfg, echo=False).wait(timeout=150)


def _bytes_per_step(run):
    """Rank 0's bytes handed to the process group per step, from the third step on (DDP's second
    backward also broadcasts its rebuilt bucket order)."""
    rows = run.metrics[(run.metrics["rank"] == 0) & (run.metrics["step"] >= 2)]
    return rows["comm_bytes"].sum() / len(rows)


def _distance(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_grad_accumulation_is_one_step_of_the_larger_batch_with_fewer_all_reduces(runs_dir):
    """k=4 micro-batches of B=8 on 2 ranks: the same weights as batch 32 (< 1e-5); one all-reduce a step either way."""
    accumulated = _train(runs_dir, strategy="data", world_size=2, batch_size=8, grad_accumulation=4)
    large = _train(runs_dir, strategy="data", world_size=2, batch_size=32)
    assert _distance(accumulated.result().state_dict, large.result().state_dict) < 1e-5
    plain = _train(runs_dir, strategy="data", world_size=2, batch_size=8)
    assert _distance(plain.result().state_dict, large.result().state_dict) > 1e-3  # the comparison can fail
    assert accumulated.summary["samples"] == 8 * 32 * 2
    # per sample, k times fewer all-reduces: the same bytes per step for 4x the samples
    assert _bytes_per_step(accumulated) == _bytes_per_step(plain) > 0


def test_fp16_compression_stays_within_fp16_rounding_of_plain_all_reduce(runs_dir):
    plain = _train(runs_dir, strategy="data", world_size=2, batch_size=16).result().state_dict
    half = _train(runs_dir, strategy="data", world_size=2, batch_size=16, compression="fp16")
    gap = _distance(half.result().state_dict, plain)
    assert 0 < gap < 1e-3  # fp16 keeps 11 bits: gradients ~1e-1 round by ~1e-4, times lr, over 8 steps
    gradient_bytes = sum(v.numel() * 4 for v in plain.values())
    assert _bytes_per_step(half) == gradient_bytes // 2  # what is really sent: half the bytes


@pytest.mark.parametrize("kind, smaller_by", [("topk", 40), ("powersgd", 40)])
def test_compressed_hooks_send_fewer_bytes(runs_dir, kind, smaller_by):
    """hidden=512: 1.2 MB of gradients, more than DDP's 1 MB first bucket (PowerSGD with two buckets
    deadlocked or mismatched its all-reduces on gloo: ddlkit keeps it to one)."""
    common = dict(strategy="data", world_size=2, batch_size=16, steps=6, hidden=512)
    run = _train(runs_dir, **common, compression=kind, topk_ratio=0.01)
    plain = _train(runs_dir, **common)
    last = {r: r.metrics[r.metrics["step"] == 5]["comm_bytes"].iloc[0] for r in (run, plain)}
    assert last[plain] > smaller_by * last[run] > 0  # (PowerSGD's first two steps are plain all-reduces)


def _local_gradient_bytes(hidden: int) -> int:
    """A tensor-parallel rank's gradient bytes at tp=2: column layers hold half their weight and bias,
    row layers half their weight (the bias is whole), an unpaired last layer all of it."""
    from torch.distributed.tensor.parallel import ColwiseParallel

    from ddlkit.data import load_dataset
    from ddlkit.models import build_model
    from ddlkit.strategies.tensor import megatron_plan

    model = build_model("mlp", load_dataset("digits"), hidden, 16)
    plan, total = megatron_plan(model), 0
    for name, param in model.named_parameters():
        layer, kind = name.split(".")
        halved = layer in plan and (kind == "weight" or isinstance(plan[layer], ColwiseParallel))
        total += param.numel() * 4 // (2 if halved else 1)
    return total


def test_hybrid_compresses_its_data_parallel_dimension(runs_dir):
    """dp=2 x tp=2: each tensor-parallel shard's gradient is averaged over its replica through the same
    hooks as data's. fp16 sends half the bytes of that average and stays within fp16 rounding; PowerSGD
    sends fewer still. (Bytes per step include the tensor-parallel all-reduces, the same in every run.)"""
    common = dict(strategy="hybrid", world_size=4, dp=2, tp=2, batch_size=8, steps=5, hidden=64)
    runs = {kind: _train(runs_dir, **common, compression=kind) for kind in ("none", "fp16", "powersgd")}
    sent = {kind: _bytes_per_step(run) for kind, run in runs.items()}
    assert sent["none"] - sent["fp16"] == _local_gradient_bytes(64) // 2  # the dp average's bytes, halved
    assert sent["powersgd"] < sent["fp16"]  # low-rank factors (from its third step)
    plain = runs["none"].result().state_dict
    assert 0 < _distance(runs["fp16"].result().state_dict, plain) < 1e-3
    assert 0 < _distance(runs["powersgd"].result().state_dict, plain) < 0.1  # an approximation, close


def test_topk_hook_sends_the_largest_entries_and_keeps_the_rest():
    """One process: top-k of 10 keeps 2 entries; error feedback adds the rest to the next step."""
    state = compression.TopK(0.2, error_feedback=True)

    class Bucket:
        def __init__(self, values):
            self.values = values

        def buffer(self):
            return self.values

        def index(self):
            return 0

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        grad = torch.tensor([0.1, -5.0, 0.2, 0.0, 3.0, 0.1, 0.1, 0.1, 0.1, 0.3])
        sent = compression.topk_hook(state, Bucket(grad.clone())).value()
        assert sent.tolist() == [0, -5.0, 0, 0, 3.0, 0, 0, 0, 0, 0]
        assert state.residuals[0].tolist() == pytest.approx([0.1, 0, 0.2, 0, 0, 0.1, 0.1, 0.1, 0.1, 0.3])
        again = compression.topk_hook(state, Bucket(torch.zeros(10))).value()  # only what was kept is left
        assert again.tolist() == pytest.approx([0, 0, 0.2, 0, 0, 0, 0, 0, 0, 0.3])
    finally:
        dist.destroy_process_group()


def test_local_sgd_syncing_every_step_by_averaging_is_data_parallel(runs_dir):
    local = _train(runs_dir, strategy="local_sgd", world_size=2, batch_size=16, sync_every=1, outer="average")
    data = _train(runs_dir, strategy="data", world_size=2, batch_size=16)
    assert _distance(local.result().state_dict, data.result().state_dict) < 1e-5
    assert _bytes_per_step(local) == _bytes_per_step(data)  # a model's worth a step, like DDP


def test_diloco_syncs_every_h_steps(runs_dir):
    """H=4 over 8 steps: 2 parameter all-reduces, a quarter of data parallelism's bytes; Nesterov moves
    the weights away from plain averaging."""
    diloco = _train(runs_dir, strategy="local_sgd", world_size=2, batch_size=16, sync_every=4, outer="nesterov")
    average = _train(runs_dir, strategy="local_sgd", world_size=2, batch_size=16, sync_every=4, outer="average")
    data = _train(runs_dir, strategy="data", world_size=2, batch_size=16)
    rows = diloco.metrics[diloco.metrics["rank"] == 0].set_index("step")["comm_bytes"]
    assert rows[rows > 0].index.tolist() == [3, 7]  # the model's bytes once every 4 steps, nothing between
    assert (rows[rows > 0] == _bytes_per_step(data)).all()
    assert _distance(diloco.result().state_dict, average.result().state_dict) > 1e-4
