"""Live controls: what ``Run.control`` may change while a run goes on, and
the state every rank applies (``ddlkit.rank.sync`` makes the ranks agree on
the step).

Rank-keyed maps (``slowdown={1: 3.0}``) travel as JSON, whose keys are
strings: :func:`to_json` and :func:`from_json` are the one place that converts.

>>> check({"lr": 0.01, "slowdown": {1: 3.0}})
>>> check({"lr": -1})
Traceback (most recent call last):
...
ValueError: control lr=-1 is invalid: it must be a positive number
>>> from_json(to_json({"slowdown": {1: 3.0}}))
{'slowdown': {1: 3.0}}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .knobs import is_number, positive_number

# What Run.control accepts, with a check and the same in words for each value.
CONTROLS = {
    "lr": (positive_number, "a positive number"),
    "paused": (lambda v: isinstance(v, bool), "True or False"),
    "stop": (lambda v: v is True, "True"),
    "slowdown": (
        lambda v: isinstance(v, dict) and all(isinstance(r, int) and is_number(f) and f >= 1 for r, f in v.items()),
        "a dict {rank: factor >= 1}, e.g. {1: 3.0} makes rank 1 three times slower",
    ),
}
RANK_KEYED = ("slowdown",)


def check(changes: dict[str, Any]) -> None:
    """Raise a ValueError naming the control, the value and what is valid."""
    for name, value in changes.items():
        if name not in CONTROLS:
            raise ValueError(f"control {name!r} is unknown: valid controls are {sorted(CONTROLS)}")
        valid, words = CONTROLS[name]
        if not valid(value):
            raise ValueError(f"control {name}={value!r} is invalid: it must be {words}")


def to_json(changes: dict[str, Any]) -> dict[str, Any]:
    """Rank keys as strings, for JSON."""
    return {k: {str(r): f for r, f in v.items()} if k in RANK_KEYED else v for k, v in changes.items()}


def from_json(changes: dict[str, Any]) -> dict[str, Any]:
    """Rank keys back to integers."""
    return {k: {int(r): f for r, f in v.items()} if k in RANK_KEYED else v for k, v in changes.items()}


@dataclass
class Controls:
    """What every rank applies at a sync step."""

    version: int = 0
    lr: float | None = None
    paused: bool = False
    stop: bool = False
    slowdown: dict[int, float] = field(default_factory=dict)
    next_sync: int = 0  # the step of the next agreement

    def slowdown_of(self, rank: int) -> float:
        return float(self.slowdown.get(rank, 1.0))

    def changed_since(self, old: Controls) -> dict[str, Any]:
        """The controls whose value differs from ``old``'s."""
        return {name: getattr(self, name) for name in CONTROLS if getattr(self, name) != getattr(old, name)}
