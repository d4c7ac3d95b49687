"""Built-in data and models: deterministic, sharded with no overlap and no drop."""

from __future__ import annotations

import pytest
import torch

from ddlkit.data import ShardedStream, load_dataset
from ddlkit.models import build_model, loss_fn


@pytest.mark.parametrize("world_size, batch_size, n", [(2, 16, 1797), (3, 7, 100), (4, 5, 64)])
def test_each_epoch_covers_every_sample_once_across_ranks(world_size, batch_size, n):
    shards = [ShardedStream(n, batch_size, r, world_size, seed=3) for r in range(world_size)]
    global_batch = world_size * batch_size
    steps = -(-2 * n // global_batch)  # two epochs and a bit
    stream = torch.cat([torch.cat([s.indices(t) for s in shards]) for t in range(steps)])
    assert torch.equal(stream[:n].sort().values, torch.arange(n))  # epoch 0: each sample once, none dropped
    assert torch.equal(stream[n : 2 * n].sort().values, torch.arange(n))  # epoch 1 too
    assert not torch.equal(stream[:n], stream[n : 2 * n])  # a fresh order each epoch


def test_ranks_of_a_step_are_disjoint_and_make_the_single_process_batch():
    ranks = [ShardedStream(1797, 16, r, 2, seed=0) for r in range(2)]
    single = ShardedStream(1797, 32, 0, 1, seed=0)
    for step in range(120):  # crosses an epoch boundary
        a, b = (s.indices(step) for s in ranks)
        assert set(a.tolist()).isdisjoint(b.tolist())
        assert torch.equal(torch.cat([a, b]), single.indices(step))


def test_same_seed_same_data_and_weights():
    for name in ("synthetic", "regression", "sonnets", "digits"):
        a, b = load_dataset(name, seed=1), load_dataset(name, seed=1)
        assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
    assert not torch.equal(load_dataset("synthetic", seed=1).inputs, load_dataset("synthetic", seed=2).inputs)
    torch.manual_seed(0)
    first = build_model("mlp", load_dataset("digits")).state_dict()
    torch.manual_seed(0)
    second = build_model("mlp", load_dataset("digits")).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize(
    "model, dataset",
    [("mlp", "digits"), ("cnn", "digits"), ("lm", "sonnets"), ("mlp", "regression"), ("mlp", "synthetic")],
)
def test_every_model_learns_its_data(model, dataset):
    torch.manual_seed(0)
    ds = load_dataset(dataset)
    net = build_model(model, ds, hidden=64)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    batch = slice(0, 64)
    first = loss_fn(ds.task, net(ds.inputs[batch]), ds.targets[batch]).item()
    for _ in range(30):
        loss = loss_fn(ds.task, net(ds.inputs[batch]), ds.targets[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.7 * first


def test_digits_come_from_scikit_learns_shipped_file():
    ds = load_dataset("digits")
    assert ds.inputs.shape == (1797, 64) and ds.inputs.max() <= 1.0
    assert sorted(ds.targets.unique().tolist()) == list(range(10))
