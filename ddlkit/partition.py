"""Splitting a dataset among federated clients: IID, Dirichlet over labels, or
label shards (McMahan et al. 2017's pathological non-IID split).

Every function is a pure function of the labels and the seed, so the server,
every client rank and a notebook compute the same split; every sample belongs
to exactly one client.

- ``iid``: a seeded permutation cut into ``clients`` parts of (nearly) equal size.
- ``dirichlet``: for each label, the shares of the clients are drawn from
  Dirichlet(``alpha``); small alpha puts most of a label on a few clients. A
  client left with no sample takes one from the client holding the most, so
  every client can train.
- ``shards``: each label's samples are cut into equal shards (``clients *
  shards_per_client`` shards in all, the same number per label, so that count
  must divide by the number of labels) and every client gets
  ``shards_per_client`` shards of different labels: exactly that many labels.

>>> labels = torch.arange(100) % 10
>>> parts = split(labels, clients=5, kind="shards", shards_per_client=2, seed=0)
>>> sorted(torch.cat(parts).tolist()) == list(range(100)), [len(set(labels[p].tolist())) for p in parts]
(True, [2, 2, 2, 2, 2])
>>> table = label_table(labels, split(labels, 4, "iid"))
>>> table.shape, int(table.sum())
((4, 10), 100)
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .data import Dataset, held_out_split, load_dataset, subset

KINDS = ("iid", "dirichlet", "shards")
REPAIR_TRIES = 10_000  # swaps to give every shard client distinct labels (a few dozen suffice)


def split(
    labels: torch.Tensor,
    clients: int,
    kind: str = "iid",
    alpha: float = 0.5,
    shards_per_client: int = 2,
    seed: int = 0,
) -> list[torch.Tensor]:
    """The sample indices of each client (sorted), for ``labels`` (one per sample)."""
    check(len(labels), clients, kind, alpha, shards_per_client, int(labels.max()) + 1 if len(labels) else 0)
    rng = np.random.default_rng(seed)
    y = labels.numpy()
    if kind == "iid":
        parts = np.array_split(rng.permutation(len(y)), clients)
    elif kind == "dirichlet":
        parts = _dirichlet(y, clients, alpha, rng)
    else:
        parts = _shards(y, clients, shards_per_client, rng)
    return [torch.from_numpy(np.sort(p)).long() for p in parts]


def check(samples: int, clients: int, kind: str, alpha: float, shards_per_client: int, labels: int) -> None:
    """One ValueError for a split that cannot be made."""
    if kind not in KINDS:
        raise ValueError(f"partition={kind!r} is invalid: valid values are {list(KINDS)}")
    if clients > samples:
        raise ValueError(f"clients={clients} is invalid: there are only {samples} training samples to share")
    if kind == "dirichlet" and not alpha > 0:
        raise ValueError(f"alpha={alpha!r} is invalid: it must be a number > 0 (small: skewed labels, large: IID)")
    if kind != "shards":
        return
    if not 1 <= shards_per_client <= labels:
        raise ValueError(
            f"shards_per_client={shards_per_client} is invalid: each client's shards have different labels, "
            f"so it must be 1..{labels} (the labels of the dataset)"
        )
    shards = clients * shards_per_client
    if shards % labels:
        raise ValueError(
            f"shards do not divide: clients * shards_per_client = {clients} * {shards_per_client} = {shards} shards "
            f"must be a multiple of the {labels} labels (every label is cut into the same number of shards)"
        )


def _dirichlet(y: np.ndarray, clients: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    parts: list[list[int]] = [[] for _ in range(clients)]
    for label in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == label))
        shares = rng.dirichlet(np.full(clients, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
        for client, chunk in enumerate(np.split(members, cuts)):
            parts[client].extend(chunk.tolist())
    for client in range(clients):  # nobody is left without data
        if not parts[client]:
            richest = max(range(clients), key=lambda c: len(parts[c]))
            parts[client].append(parts[richest].pop())
    return [np.array(p, dtype=np.int64) for p in parts]


def _shards(y: np.ndarray, clients: int, per_client: int, rng: np.random.Generator) -> list[np.ndarray]:
    labels = np.unique(y)
    per_label = clients * per_client // len(labels)
    shards, shard_label = [], []
    for label in labels:
        members = rng.permutation(np.flatnonzero(y == label))
        shards += np.array_split(members, per_label)
        shard_label += [label] * per_label
    owner = rng.permutation(len(shards)).reshape(clients, per_client)  # shard ids per client
    label_of = np.array(shard_label)
    for _ in range(REPAIR_TRIES):  # swap shards until no client holds two of one label
        clash = next((c for c in range(clients) if len(set(label_of[owner[c]])) < per_client), None)
        if clash is None:
            break
        slot = _repeated_slot(label_of[owner[clash]])
        other, other_slot = rng.integers(clients), rng.integers(per_client)
        mine, theirs = owner[clash, slot], owner[other, other_slot]
        rest_mine = set(label_of[np.delete(owner[clash], slot)])
        rest_theirs = set(label_of[np.delete(owner[other], other_slot)])
        if other != clash and label_of[theirs] not in rest_mine and label_of[mine] not in rest_theirs:
            owner[clash, slot], owner[other, other_slot] = theirs, mine
    else:
        raise ValueError(f"could not give {clients} clients {per_client} shards of different labels each")
    return [np.concatenate([shards[s] for s in row]) for row in owner]


def _repeated_slot(labels: np.ndarray) -> int:
    seen: set[int] = set()
    for slot, label in enumerate(labels.tolist()):
        if label in seen:
            return slot
        seen.add(label)
    return 0


def of_config(cfg: Any) -> tuple[Dataset, list[torch.Tensor]]:
    """A federated config's training samples (the held-out ones removed when it
    evaluates, as its ranks do) and each client's indices into them.

    >>> from ddlkit.config import RunConfig
    >>> data, parts = of_config(RunConfig(strategy="federated", clients=20, partition="shards", eval_every=1))
    >>> len(data), len(parts), label_table(data.targets, parts).astype(bool).sum(1).tolist() == [2] * 20
    (1438, 20, True)
    """
    dataset = load_dataset(cfg.dataset, cfg.seed, cfg.seq_len)
    if cfg.eval_every is not None:
        dataset = subset(dataset, held_out_split(dataset, cfg.seed)[0])
    return dataset, split(labels_of(dataset), cfg.clients, cfg.partition, cfg.alpha, cfg.shards_per_client, cfg.seed)


def labels_of(dataset: Dataset) -> torch.Tensor:
    """What label partitions split by: the classes; one label for data without classes."""
    return dataset.targets if dataset.task == "classify" else torch.zeros(len(dataset), dtype=torch.long)


def label_table(labels: torch.Tensor, parts: list[torch.Tensor], num_labels: int | None = None) -> np.ndarray:
    """Samples per client (rows) and label (columns)."""
    width = num_labels or int(labels.max()) + 1
    return np.stack([np.bincount(labels[p].numpy(), minlength=width) for p in parts])


def skew(table: np.ndarray) -> float:
    """How far the clients' label mixes are from the whole dataset's: the mean
    total-variation distance, 0 for identical mixes, 1 for disjoint labels.

    >>> skew(np.array([[5, 5], [5, 5]])), skew(np.array([[10, 0], [0, 10]]))
    (0.0, 0.5)
    """
    overall = table.sum(0) / table.sum()
    mixes = table / np.maximum(table.sum(1, keepdims=True), 1)
    return float(0.5 * np.abs(mixes - overall).sum(1).mean())
