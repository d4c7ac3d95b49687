"""Heterogeneous ranks: each rank's persistent compute speed.

``speeds={rank: factor}`` declares relative speeds (ranks not named: 1.0);
``rank_profile`` draws them from a device profile of ``ddlkit.devices`` by the
seed (the federated clients' profiles, here one device per rank). Speeds are
relative: the fastest rank runs at this machine's speed (1.0) and a rank at
0.5 takes twice as long for the same work (``ddlkit.rank.stragglers`` pauses
it). Unlike the live ``slowdown`` control, a speed holds for the whole run.

>>> rank_speeds({1: 0.5}, None, world_size=3)
[1.0, 0.5, 1.0]
>>> rank_speeds({0: 4.0, 1: 2.0}, None, world_size=2)  # relative: the fastest is 1.0
[1.0, 0.5]
>>> rank_speeds({1: 0.25}, "uniform", world_size=2)  # a named speed over a profile's
[1.0, 0.25]
>>> check_speeds({2: 0.5}, None, world_size=2)
Traceback (most recent call last):
...
ValueError: speeds={2: 0.5} is invalid: it must be a dict {rank: speed > 0} with ranks 0..1 ...
"""

from __future__ import annotations

import math
from typing import Any

from . import devices
from .knobs import choice_problem, is_int, is_number, require


def check_speeds(speeds: Any, rank_profile: Any, world_size: int) -> None:
    """One ValueError for speeds or a profile that cannot be used."""
    if speeds is not None and not (
        isinstance(speeds, dict)
        and all(is_int(r) and 0 <= r < world_size and is_number(f) and 0 < f < math.inf for r, f in speeds.items())
    ):
        raise ValueError(
            f"speeds={speeds!r} is invalid: it must be a dict {{rank: speed > 0}} with ranks 0..{world_size - 1} "
            "(e.g. {1: 0.5}: rank 1 at half speed)"
        )
    if rank_profile is not None:
        require(choice_problem("rank_profile", rank_profile, [*devices.KINDS, None]))


def rank_speeds(
    speeds: dict[int, float] | None, rank_profile: str | None, world_size: int, seed: int = 0
) -> list[float]:
    """Every rank's relative speed, the fastest 1.0 (see the module doc)."""
    drawn = devices.profile(rank_profile, world_size, seed).speed if rank_profile else [1.0] * world_size
    drawn = [float(value / max(drawn)) for value in drawn]  # relative, like the named speeds
    values = [float((speeds or {}).get(rank, drawn[rank])) for rank in range(world_size)]
    fastest = max(values)
    return [value / fastest for value in values]


def declared(cfg: Any) -> bool:
    """Whether the config names speeds (a balancer can then share work by them from the start)."""
    return bool(cfg.speeds) or cfg.rank_profile is not None
