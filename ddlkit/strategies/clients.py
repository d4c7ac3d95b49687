"""One federated client's round: local training from the global model, and
the update it sends back. (Not a strategy: what ``federated.py`` runs on its
client ranks.)

- FedAvg (McMahan et al. 2017): ``local_epochs`` passes over the client's
  data in batches of ``local_batch`` (None: the whole of it, one step an
  epoch: with one epoch that is FedSGD), with the run's optimizer, fresh each
  round; the update is the new weights minus the global ones.
- FedProx (Li et al. 2020): the same plus ``mu/2 |w - w_global|^2`` in the
  local objective (its gradient ``mu (w - w_global)`` is added to each step's),
  and partial work is welcome: a slow client sends what it did by the deadline.
- SCAFFOLD (Karimireddy et al. 2020, option II): every step's gradient is
  corrected by ``c - c_i`` (server and client control variates); afterwards
  ``c_i`` moves by ``-c - update / (steps * lr)``.

Data order: client ``k`` reads its samples through its own seeded stream of
epochs (``ShardedStream`` with seed ``seed + CLIENT_SEED * k``), round ``r``
starting at local step ``r * steps_per_round``. So one client holding all the
data trains step for step like ``single`` with the same batch.

>>> local_steps(samples=14, epochs=5, batch=10), local_steps(samples=14, epochs=1, batch=None)
(7, 1)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn.utils import parameters_to_vector

from ..data import Dataset, ShardedStream
from ..models import loss_fn
from ..rank.strategy import OptimizerFactory
from .sharding import load_flat

CLIENT_SEED = 1_000_003  # client k's data order: seed + CLIENT_SEED * k


def local_steps(samples: int, epochs: int, batch: int | None) -> int:
    """The local steps of a whole round's work: ``epochs`` passes of ``batch`` (None: all) samples."""
    return epochs if batch is None else math.ceil(epochs * samples / batch)


@dataclass
class Setting:
    """What the server says for a round, the same for all its clients (live knobs included)."""

    round: int
    lr: float
    local_epochs: int
    local_batch: int | None
    mu: float  # proximal weight (FedProx; 0 otherwise)
    scaffold: bool


@dataclass
class Outcome:
    update: torch.Tensor  # new local weights minus the global ones, flat
    loss: float  # mean training loss over the local steps
    steps: int
    control_delta: torch.Tensor | None = None  # SCAFFOLD: how much c_i moved


class LocalTrainer:
    """Trains any client of the run on this rank: one model, reloaded per client."""

    def __init__(
        self,
        model: torch.nn.Module,
        data: Dataset,
        parts: list[torch.Tensor],
        task: str,
        make_optimizer: OptimizerFactory,
        seed: int,
    ):
        self.model, self.data, self.parts, self.task = model, data, parts, task
        self.make_optimizer, self.seed = make_optimizer, seed
        self.streams: dict[tuple[int, int], ShardedStream] = {}

    def planned_steps(self, client: int, setting: Setting) -> int:
        return local_steps(len(self.parts[client]), setting.local_epochs, setting.local_batch)

    def batch(self, client: int, setting: Setting, local_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The samples of ``client``'s local step (``round * steps_per_round + local_step`` of its stream)."""
        part = self.parts[client]
        size = setting.local_batch or len(part)
        key = (client, size)
        if key not in self.streams:
            self.streams[key] = ShardedStream(len(part), size, 0, 1, self.seed + CLIENT_SEED * client)
        position = setting.round * self.planned_steps(client, setting) + local_step
        index = part[self.streams[key].indices(position)]
        return self.data.inputs[index], self.data.targets[index]

    def train(
        self,
        client: int,
        steps: int,
        start: torch.Tensor,
        setting: Setting,
        controls: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> Outcome:
        """``steps`` local steps of ``client`` from the global weights ``start``
        (flat); ``controls``: SCAFFOLD's (c, c_i)."""
        params = list(self.model.parameters())
        load_flat(params, start)  # a copy: the optimizer must not write into the global weights
        anchor = [p.detach().clone() for p in params]  # the global weights, per tensor
        optimizer = self.make_optimizer(params)
        for group in optimizer.param_groups:
            group["lr"] = setting.lr
        shaped = [_shaped(c, params) for c in controls] if controls is not None else None
        loss_sum = 0.0
        for local_step in range(steps):
            inputs, targets = self.batch(client, setting, local_step)
            loss = loss_fn(self.task, self.model(inputs), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for i, (p, a) in enumerate(zip(params, anchor, strict=True)):
                assert p.grad is not None
                if setting.mu:
                    p.grad.add_(p.detach() - a, alpha=setting.mu)
                if shaped is not None:
                    p.grad.add_(shaped[0][i] - shaped[1][i])
            optimizer.step()
            loss_sum += loss.item()
        update = parameters_to_vector(params).detach() - start
        outcome = Outcome(update, loss_sum / max(steps, 1), steps)
        if controls is not None:
            outcome.control_delta = -controls[0] - update / (steps * setting.lr)
        return outcome


def _shaped(flat: torch.Tensor, like: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    out, offset = [], 0
    for p in like:
        out.append(flat[offset : offset + p.numel()].view_as(p))
        offset += p.numel()
    return out
