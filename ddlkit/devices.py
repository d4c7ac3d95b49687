"""Simulated edge devices: each federated client's compute speed and network
link, drawn once from a seeded profile, and what a round's work costs on them.

Profiles (``devices=``):

- ``uniform``: every client is the reference device: ``REFERENCE_SPEED``
  training samples a second (forward and backward of the small built-in
  models), ``REFERENCE_LATENCY_S`` per transfer, ``REFERENCE_DOWN_BPS`` /
  ``REFERENCE_UP_BPS`` (bits a second) down / up.
- ``edge``: speeds and bandwidths spread log-normally around those (sigma
  0.5) and a slow tail: ``SLOW_SHARE`` of the clients are 4-10x slower to
  compute and have a 4-10x slower, twice as late link (old phones on a weak signal).

A client's round (:meth:`Devices.plan`): download the model, ``steps`` local
steps of ``batch`` samples, upload the update. Against a ``deadline_s`` a
client that would finish late is dropped, or, where partial work is welcome
(FedProx), does the steps that fit. ``dropout`` makes a client vanish with
that probability each round (seeded per round and client).

>>> devices = profile("edge", clients=100, seed=0)
>>> fast, slow = int(devices.speed.argmax()), int(devices.speed.argmin())
>>> float(devices.speed[fast] / devices.speed[slow]) > 10
True
>>> whole = devices.plan(slow, steps=7, batch=10, bytes_down=10**5, bytes_up=10**5, deadline_s=None)
>>> whole.steps, whole.reason
(7, '')
>>> late = dict(steps=7, batch=10, bytes_down=10**5, bytes_up=10**5, deadline_s=0.95 * whole.sim_s)
>>> devices.plan(slow, **late).reason, devices.plan(slow, **late, partial=True)  # doctest: +ELLIPSIS
('deadline', Plan(steps=6, sim_s=..., reason='partial'))
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

KINDS = ("uniform", "edge")
REFERENCE_SPEED = 500.0  # training samples per second
REFERENCE_LATENCY_S = 0.02
REFERENCE_DOWN_BPS = 20e6
REFERENCE_UP_BPS = 5e6
SLOW_SHARE = 0.25


@dataclass(frozen=True)
class Plan:
    """One client's round: the local steps it does (0: none arrive), the
    simulated seconds until its update arrives (or it would have), and why it
    is short: "" (all its work), "partial", "deadline" or "dropout"."""

    steps: int
    sim_s: float
    reason: str = ""

    @property
    def dropped(self) -> bool:
        return self.steps == 0


@dataclass(frozen=True)
class Devices:
    speed: np.ndarray  # training samples per second, per client
    latency_s: np.ndarray
    down_bps: np.ndarray
    up_bps: np.ndarray

    def plan(
        self,
        client: int,
        steps: int,
        batch: int,
        bytes_down: int,
        bytes_up: int,
        deadline_s: float | None,
        partial: bool = False,
    ) -> Plan:
        """What ``client`` gets done of ``steps`` local steps before the deadline."""
        link_s = 2 * self.latency_s[client] + 8 * (bytes_down / self.down_bps[client] + bytes_up / self.up_bps[client])
        step_s = batch / self.speed[client]
        whole = float(link_s + steps * step_s)
        if deadline_s is None or whole <= deadline_s:
            return Plan(steps, whole)
        fit = min(steps - 1, math.floor((deadline_s - link_s) / step_s)) if partial else 0
        if fit >= 1:
            return Plan(fit, float(link_s + fit * step_s), "partial")
        return Plan(0, whole, "deadline")


def profile(kind: str, clients: int, seed: int = 0) -> Devices:
    """Every client's device, drawn from the profile with ``seed``."""
    ones = np.ones(clients)
    if kind == "uniform":
        return Devices(
            REFERENCE_SPEED * ones, REFERENCE_LATENCY_S * ones, REFERENCE_DOWN_BPS * ones, REFERENCE_UP_BPS * ones
        )
    if kind != "edge":
        raise ValueError(f"devices={kind!r} is invalid: valid values are {list(KINDS)}")
    rng = np.random.default_rng([seed, 7])  # its own stream: the partition's draws stay as they are
    spread = lambda: np.exp(rng.normal(0.0, 0.5, clients))  # noqa: E731
    slow = rng.random(clients) < SLOW_SHARE
    slower = np.where(slow, rng.uniform(4.0, 10.0, clients), 1.0)
    return Devices(
        REFERENCE_SPEED * spread() / slower,
        REFERENCE_LATENCY_S * spread() * np.where(slow, 2.0, 1.0),
        REFERENCE_DOWN_BPS * spread() / slower,
        REFERENCE_UP_BPS * spread() / slower,
    )


def dropouts(probability: float, clients: list[int], round_: int, seed: int) -> set[int]:
    """The clients among ``clients`` that vanish in this round (seeded per round).

    >>> sorted(dropouts(0.5, list(range(10)), round_=3, seed=0)) == sorted(dropouts(0.5, list(range(10)), 3, 0))
    True
    """
    if probability <= 0:
        return set()
    rng = np.random.default_rng([seed, round_, 11])
    draws = rng.random(max(clients, default=-1) + 1)
    return {c for c in clients if draws[c] < probability}
