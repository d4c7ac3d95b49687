"""Planning and combining a federated round (not a strategy: what the server,
``fedserver.py``, decides): which clients, what each gets done on its device,
who trains whom, and how their updates become the next global update.

Everything the server decides is a pure function of the seed and the round
(sampling, dropouts, devices), and updates are summed in client order, so a
run's result does not depend on how many ranks simulate the clients, and a
run restarted from a round's checkpoint redoes the same rounds.

>>> assign({4: 70, 9: 10, 2: 30, 5: 0}, trainers=[1, 2])
{1: [4], 2: [2, 5, 9]}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .. import privacy, secagg
from ..devices import Devices, Plan, dropouts
from .clients import Setting, local_steps

FLOAT_BYTES, FIXED_POINT_BYTES = 4, 8  # what a device sends per value: float32, or 64-bit fixed point (secagg)
SERVER_OPTIMIZERS = ("avg", "fedavgm", "fedadam")


def sample(clients: int, fraction: float, round_: int, seed: int, poisson: bool) -> list[int]:
    """The round's clients: ``max(1, round(fraction * clients))`` of them without
    replacement, or (``poisson``, for differential privacy) each with probability ``fraction``.

    >>> sample(100, 0.1, round_=0, seed=0, poisson=False) == sample(100, 0.1, 0, 0, False)
    True
    >>> len(sample(100, 0.1, 0, 0, poisson=False)), len(sample(100, 1.0, 0, 0, poisson=True))
    (10, 100)
    """
    rng = np.random.default_rng([seed, round_, 1])
    if poisson:
        return np.flatnonzero(rng.random(clients) < fraction).tolist()
    return sorted(rng.choice(clients, max(1, round(fraction * clients)), replace=False).tolist())


def assign(work: dict[int, int], trainers: list[int]) -> dict[int, list[int]]:
    """Clients onto client ranks, the most work first onto the least loaded rank."""
    load = dict.fromkeys(trainers, 0)
    jobs: dict[int, list[int]] = {t: [] for t in trainers}
    for client in sorted(work, key=lambda c: (-work[c], c)):
        rank = min(trainers, key=lambda t: (load[t], len(jobs[t]), t))
        jobs[rank].append(client)
        load[rank] += work[client]
    return {t: sorted(clients) for t, clients in jobs.items()}


def make_server_optimizer(kind: str, params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """avg: the new weights are the clients' weighted mean (SGD, lr 1, on the
    pseudo-gradient -update); fedavgm: server momentum 0.9; fedadam: Adam with
    beta2 0.99 and eps 1e-3 (Reddi et al. 2021)."""
    if kind == "avg":
        return torch.optim.SGD(params, lr=1.0)
    if kind == "fedavgm":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.99), eps=1e-3)


@dataclass
class RoundPlan:
    """A round before training: the setting sent, each sampled client's plan."""

    setting: Setting
    sampled: list[int]
    plans: dict[int, Plan]
    bytes_down: int  # per client
    bytes_up: int  # per client that completes

    def completed(self) -> list[int]:
        return [c for c in self.sampled if not self.plans[c].dropped]

    def dropped(self) -> list[int]:
        return [c for c in self.sampled if self.plans[c].dropped]

    def sim_s(self, deadline_s: float | None) -> float:
        """Simulated seconds until the server has what it waits for: the last
        update, or the deadline if someone never arrives."""
        arrived = [self.plans[c].sim_s for c in self.completed()]
        if self.dropped() and deadline_s is not None:
            return deadline_s
        return max(arrived, default=0.0)


def plan_round(cfg: Any, setting: Setting, devices: Devices, sizes: list[int], size: int) -> RoundPlan:
    """Sample the round's clients and plan each one's work on its device."""
    poisson = cfg.dp_noise_multiplier > 0
    sampled = sample(cfg.clients, cfg.fraction, setting.round, cfg.seed, poisson)
    gone = dropouts(cfg.dropout, sampled, setting.round, cfg.seed)
    values = size + 1 + (size if setting.scaffold else 0)
    bytes_down = (size * (2 if setting.scaffold else 1)) * FLOAT_BYTES
    bytes_up = values * (FIXED_POINT_BYTES if cfg.secure_aggregation else FLOAT_BYTES)
    plans = {}
    for client in sampled:
        steps = local_steps(sizes[client], setting.local_epochs, setting.local_batch)
        if client in gone:
            plans[client] = Plan(0, 0.0, "dropout")
            continue
        batch = setting.local_batch or sizes[client]
        fedprox = cfg.algorithm == "fedprox"
        plans[client] = devices.plan(client, steps, batch, bytes_down, bytes_up, cfg.deadline_s, partial=fedprox)
    return RoundPlan(setting, sampled, plans, bytes_down, bytes_up)


def combine(rows: dict[int, torch.Tensor], reveals: list[torch.Tensor], secure: bool, size: int) -> torch.Tensor:
    """The sum of the clients' rows (in client order), unmasked if ``secure``."""
    if not rows:
        return torch.zeros(size + 1, dtype=torch.float64)
    ordered = [rows[c] for c in sorted(rows)]
    if secure:
        return secagg.aggregate(
            [r.numpy().view(np.uint64) for r in ordered], [r.numpy().view(np.uint64) for r in reveals]
        )
    return torch.stack(ordered).sum(0)


def server_update(cfg: Any, total: torch.Tensor, round_: int, size: int) -> torch.Tensor:
    """The global update from the clients' summed ``[weight * update, weight]``:
    their weighted mean; with DP, noise on the sum, over the expected client count."""
    summed, weights = total[:size].clone(), float(total[size])
    if cfg.dp_noise_multiplier > 0:
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + round_)
        summed += privacy.noise(size, cfg.dp_noise_multiplier * cfg.dp_clip, generator)
        return summed / (cfg.fraction * cfg.clients)
    return summed / weights if weights > 0 else summed
