"""Client-level differential privacy for federated averaging (DP-FedAvg,
McMahan et al. 2018), with the privacy spent counted by opacus's RDP accountant.

Each round: every client's update is clipped to L2 norm ``dp_clip``; the
server adds Gaussian noise of standard deviation ``dp_noise_multiplier *
dp_clip`` to their sum and divides by the *expected* number of clients
(``fraction * clients``), so one client's presence moves the result by at
most ``dp_clip`` over that number. Clients are sampled by Poisson sampling
(each independently, with probability ``fraction``): that is what the
subsampled-Gaussian analysis assumes. The accountant turns the rounds so far
(noise multiplier, sampling rate) into epsilon at ``dp_delta``
(Mironov 2017; Mironov, Talwar, Zhang 2019).

The noise is added by the server to the sum (central DP: the server is
trusted with the sum, not with single updates when secure aggregation is on).

>>> clip(torch.tensor([3.0, 4.0]), 1.0).tolist()
[0.6000000238418579, 0.800000011920929]
>>> accountant = Accountant()
>>> for _ in range(10):
...     accountant.step(noise_multiplier=1.0, sample_rate=0.1)
>>> 0 < accountant.epsilon(1e-5) < accountant.epsilon(1e-7)
True
"""

from __future__ import annotations

from typing import Any

import torch


def clip(update: torch.Tensor, bound: float) -> torch.Tensor:
    """``update`` scaled down to L2 norm ``bound`` if it is longer."""
    norm = float(update.norm())
    return update * (bound / norm) if norm > bound else update


def noise(size: int, std: float, generator: torch.Generator) -> torch.Tensor:
    """Gaussian noise for the sum of the clipped updates."""
    return torch.randn(size, generator=generator, dtype=torch.float64) * std


class Accountant:
    """The privacy spent so far: opacus's RDP accountant, one step per round.
    (opacus is imported on first use: a few seconds, only in runs with DP.)"""

    def __init__(self, history: list[Any] | None = None) -> None:
        from opacus.accountants import RDPAccountant

        self.rdp = RDPAccountant()
        self.rdp.history = [tuple(entry) for entry in history or []]

    def step(self, noise_multiplier: float, sample_rate: float) -> None:
        self.rdp.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)

    def epsilon(self, delta: float) -> float:
        return float(self.rdp.get_epsilon(delta)) if self.rdp.history else 0.0

    @property
    def history(self) -> list[list[float]]:
        """(noise multiplier, sample rate, rounds) runs: what a checkpoint keeps."""
        return [list(entry) for entry in self.rdp.history]
