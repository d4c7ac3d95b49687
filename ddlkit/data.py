"""Built-in datasets and the rule that shards them across ranks.

Everything here is small, ships with the installed packages (scikit-learn's
digits, a public-domain text in ``ddlkit/assets``) or is generated from the
seed, so nothing is downloaded at run time.

Sharding: the samples form one endless stream, epoch after epoch, each epoch a
fresh seeded permutation. Global step ``t`` takes the next ``world_size *
batch_size`` positions of the stream and rank ``r`` takes its contiguous
``batch_size`` of them (or its *share*, when a balancer gives ranks uneven
shares of the same global batch: ``ShardedStream.set_shares``). Within an epoch no sample is seen twice and none is
dropped (a batch may straddle two epochs), and the union of the ranks' batches
at step ``t`` is exactly the batch a single process with ``world_size *
batch_size`` would take: that is what makes data parallelism exact.
"""

from __future__ import annotations

import gzip
import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

ASSETS = Path(__file__).parent / "assets"
HELD_OUT = 0.2  # the share of a dataset kept for evaluation when a run evaluates (``eval_every``)


@dataclass(frozen=True)
class Dataset:
    name: str
    inputs: torch.Tensor  # (n, features) float, or (n, seq_len) token ids
    targets: torch.Tensor  # (n,) class ids, (n, 1) values, or (n, seq_len) next tokens
    task: str  # "classify" | "regress" | "lm"
    num_outputs: int  # classes, 1 for regression, vocabulary size for lm

    def __len__(self) -> int:
        return len(self.inputs)


def load_dataset(name: str, seed: int = 0, seq_len: int = 32) -> Dataset:
    """Build a built-in dataset; deterministic for a given seed.

    >>> ds = load_dataset("digits")
    >>> ds.inputs.shape, ds.task, ds.num_outputs
    (torch.Size([1797, 64]), 'classify', 10)
    """
    if name == "digits":
        pixels, digits = _digits()
        return Dataset(name, torch.from_numpy(pixels), torch.from_numpy(digits), "classify", 10)
    gen = torch.Generator().manual_seed(seed)
    if name == "synthetic":  # 10 Gaussian blobs in 64 dimensions
        centers = 2.0 * torch.randn(10, 64, generator=gen)
        labels = torch.randint(0, 10, (2048,), generator=gen)
        x = centers[labels] + torch.randn(2048, 64, generator=gen)
        return Dataset(name, x, labels, "classify", 10)
    if name == "regression":  # y = x.w + noise
        x = torch.randn(2048, 64, generator=gen)
        w = torch.randn(64, 1, generator=gen) / 8
        y = x @ w + 0.1 * torch.randn(2048, 1, generator=gen)
        return Dataset(name, x, y, "regress", 1)
    if name == "sonnets":  # next-character prediction on every window of the text
        ids, vocab = _sonnet_ids()
        windows = ids.unfold(0, seq_len + 1, 1)
        return Dataset(name, windows[:, :-1].contiguous(), windows[:, 1:].contiguous(), "lm", len(vocab))
    raise ValueError(f"dataset={name!r} is invalid: valid values are ['digits', 'synthetic', 'regression', 'sonnets']")


# Samples of each built-in dataset (a test checks them against load_dataset); sonnets depends on seq_len.
SIZES = {"digits": 1797, "synthetic": 2048, "regression": 2048}


def dataset_size(name: str, seq_len: int = 32) -> int:
    """How many samples ``load_dataset(name, seq_len=seq_len)`` has, without building it.

    >>> dataset_size("digits"), dataset_size("sonnets", seq_len=32) == len(load_dataset("sonnets", seq_len=32))
    (1797, True)
    """
    if name == "sonnets":  # every window of seq_len + 1 characters
        return len(_sonnet_text()) - seq_len
    return SIZES[name]


def read_shipped_files() -> None:
    """Read the files behind the data sets that ship with installed packages
    (digits, sonnets; never a download) into this process's caches. The warm
    starter does, so every rank forked from it has them (~0.1 s each saved).
    Numpy and file reads only: no torch op, which could start a thread pool
    that forked children inherit broken. A data set whose package is missing is skipped.

    >>> read_shipped_files(); _digits.cache_info().currsize
    1
    """
    _sonnet_text()
    if importlib.util.find_spec("sklearn") is not None:
        _digits()


@lru_cache(maxsize=1)
def _sonnet_text() -> str:
    return (ASSETS / "sonnets.txt").read_text()


def held_out_split(dataset: Dataset, seed: int = 0, fraction: float = HELD_OUT) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the training samples and of the held-out ones, a pure function
    of the dataset and the seed: every rank and every strategy trains on the same
    samples and none of them ever trains on a held-out one. The held-out samples
    are a seeded random ``fraction``; for ``sonnets`` (overlapping windows of one
    text) the end of the text, ``seq_len`` characters apart from the training
    windows so that no character is in both.

    >>> train, test = held_out_split(load_dataset("digits"))
    >>> len(train), len(test), len(set(train.tolist()) & set(test.tolist()))
    (1438, 359, 0)
    """
    n = len(dataset)
    tested = int(n * fraction)
    if dataset.task == "lm":
        gap = dataset.inputs.shape[1]  # windows closer than seq_len share characters
        return torch.arange(0, n - tested - gap), torch.arange(n - tested, n)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[tested:].sort().values, order[:tested].sort().values


def subset(dataset: Dataset, index: torch.Tensor) -> Dataset:
    """The samples of ``dataset`` at ``index``, in that order."""
    return Dataset(dataset.name, dataset.inputs[index], dataset.targets[index], dataset.task, dataset.num_outputs)


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    # Read the CSV that scikit-learn ships rather than importing sklearn (a second
    # of start-up in every worker for one small table).
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("dataset 'digits' needs scikit-learn installed: pip install scikit-learn")
    csv = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    with gzip.open(csv, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    return table[:, :-1] / 16.0, table[:, -1].astype(np.int64)


@lru_cache(maxsize=1)
def _sonnet_ids() -> tuple[torch.Tensor, str]:
    text = _sonnet_text()
    vocab = "".join(sorted(set(text)))
    lookup = {ch: i for i, ch in enumerate(vocab)}
    return torch.tensor([lookup[ch] for ch in text], dtype=torch.long), vocab


def split_batch(total: int, weights: list[float]) -> list[int]:
    """``total`` samples shared in proportion to ``weights``, each share at least
    1, rounded by largest remainder (a pure function: every rank given the same
    weights computes the same shares).

    >>> split_batch(64, [1.0, 0.5])
    [43, 21]
    >>> split_batch(10, [1.0, 1e-9, 1.0])
    [5, 1, 4]
    >>> split_batch(7, [1.0, 1.0, 1.0])
    [3, 2, 2]
    """
    if total < len(weights):
        raise ValueError(f"cannot share {total} samples among {len(weights)} ranks: each needs at least one")
    exact = [total * w / sum(weights) for w in weights]
    shares = [max(1, int(x)) for x in exact]
    while sum(shares) > total:  # the minimum of 1 overdrew: take from the most over-served
        shares[max((r for r in range(len(shares)) if shares[r] > 1), key=lambda r: shares[r] - exact[r])] -= 1
    by_remainder = sorted(range(len(weights)), key=lambda r: (shares[r] - exact[r], r))
    for r in by_remainder[: total - sum(shares)]:
        shares[r] += 1
    return shares


class ShardedStream:
    """This rank's sample indices for any global step (see the module doc).

    >>> a = ShardedStream(10, batch_size=2, rank=0, world_size=2, seed=0)
    >>> b = ShardedStream(10, batch_size=2, rank=1, world_size=2, seed=0)
    >>> both = ShardedStream(10, batch_size=4, rank=0, world_size=1, seed=0)
    >>> torch.equal(torch.cat([a.indices(3), b.indices(3)]), both.indices(3))
    True
    """

    def __init__(self, num_samples: int, batch_size: int, rank: int, world_size: int, seed: int):
        self.n = num_samples
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shares = [batch_size] * world_size
        self._perms: dict[int, torch.Tensor] = {}

    def set_shares(self, shares: list[int]) -> None:
        """From now on rank ``r`` takes ``shares[r]`` of each global batch (its
        positions follow the lower ranks' shares): the global batch, and so
        every sample's place in the epoch, stays the same.

        >>> a, b = (ShardedStream(10, batch_size=2, rank=r, world_size=2, seed=0) for r in (0, 1))
        >>> for stream in (a, b):
        ...     stream.set_shares([3, 1])
        >>> both = ShardedStream(10, batch_size=4, rank=0, world_size=1, seed=0)
        >>> len(a.indices(3)), torch.equal(torch.cat([a.indices(3), b.indices(3)]), both.indices(3))
        (3, True)
        """
        if len(shares) != self.world_size or sum(shares) != self.batch_size * self.world_size or min(shares) < 1:
            raise ValueError(
                f"shares={shares} is invalid: give {self.world_size} positive counts adding up to the global batch "
                f"{self.batch_size * self.world_size}"
            )
        self.shares = list(shares)

    def indices(self, step: int) -> torch.Tensor:
        count = self.shares[self.rank]
        start = step * self.world_size * self.batch_size + sum(self.shares[: self.rank])
        positions = torch.arange(start, start + count)
        epochs = positions // self.n
        out = torch.empty(count, dtype=torch.long)
        for epoch in epochs.unique().tolist():
            mask = epochs == epoch
            out[mask] = self._perm(epoch)[positions[mask] % self.n]
        return out

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            self._perms = {epoch: torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))}
        return self._perms[epoch]
