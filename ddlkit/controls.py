"""Live controls: what ``Run.control`` may change while a run goes on, and
the state every rank applies (``ddlkit.rank.sync`` makes the ranks agree on
the step).

Besides the controls every run has (:data:`CONTROLS`), a strategy's knobs
marked ``live`` (``ddlkit.knobs.Knob``) are controls of its runs; they travel
nested under ``"knobs"``. Rank-keyed maps (``slowdown={1: 3.0}``) travel as
JSON, whose keys are strings: :func:`to_json` and :func:`from_json` are the one
place that converts.

>>> check({"lr": 0.01, "slowdown": {1: 3.0}})
>>> check({"lr": -1})
Traceback (most recent call last):
...
ValueError: control lr=-1 is invalid: it must be a positive number
>>> to_json({"slowdown": {1: 3.0}, "fraction": 0.2})
{'slowdown': {'1': 3.0}, 'knobs': {'fraction': 0.2}}
>>> from_json(to_json({"slowdown": {1: 3.0}}))
{'slowdown': {1: 3.0}}
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .knobs import Knob, is_number, positive_number
from .network import VALID as NETWORK_VALID
from .network import problem as network_problem

# What Run.control accepts, with a check and the same in words for each value.
CONTROLS = {
    "lr": (positive_number, "a positive number"),
    "paused": (lambda v: isinstance(v, bool), "True or False"),
    "stop": (lambda v: v is True, "True"),
    # With stop: the ranks checkpoint the step they stop at (a relaunch goes on from it).
    "save": (lambda v: v is True, "True (with stop=True: checkpoint the step the ranks stop at)"),
    "slowdown": (
        lambda v: isinstance(v, dict) and all(isinstance(r, int) and is_number(f) and f >= 1 for r, f in v.items()),
        "a dict {rank: factor >= 1}, e.g. {1: 3.0} makes rank 1 three times slower",
    ),
    "network": (lambda v: network_problem(v) is None, NETWORK_VALID),
}
RANK_KEYED = ("slowdown",)
# A followed run's controls (ddlkit.follow): every change so far, as JSON, with a rising "sequence".
CONTROL_FILE = "control.json"


def check(changes: dict[str, Any], live_knobs: Sequence[Knob] = ()) -> None:
    """Raise a ValueError naming the control, the value and what is valid;
    ``live_knobs`` are the run's strategy's knobs that may change live."""
    knobs = {knob.name: knob for knob in live_knobs}
    for name, value in changes.items():
        if name in knobs:
            message = knobs[name].problem(value)
            if message is not None:
                raise ValueError(f"control {message}")
            continue
        if name not in CONTROLS:
            raise ValueError(f"control {name!r} is unknown: valid controls are {sorted([*CONTROLS, *knobs])}")
        valid, words = CONTROLS[name]
        if not valid(value):
            raise ValueError(f"control {name}={value!r} is invalid: it must be {words}")


def to_json(changes: dict[str, Any]) -> dict[str, Any]:
    """For JSON: rank keys as strings, a strategy's knobs nested under ``"knobs"``."""
    wire: dict[str, Any] = {}
    for name, value in changes.items():
        if name in RANK_KEYED:
            wire[name] = {str(r): f for r, f in value.items()}
        elif name in CONTROLS:
            wire[name] = value
        else:
            wire.setdefault("knobs", {}).update(value if name == "knobs" else {name: value})
    return wire


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
    save: bool = False  # at the stop, checkpoint the step
    slowdown: dict[int, float] = field(default_factory=dict)
    network: Any = None  # None: as the config says
    knobs: dict[str, Any] = field(default_factory=dict)  # the strategy's live knobs changed so far
    next_sync: int = 0  # the step of the next agreement

    def slowdown_of(self, rank: int) -> float:
        return float(self.slowdown.get(rank, 1.0))

    def changed_since(self, old: Controls) -> dict[str, Any]:
        """The controls whose value differs from ``old``'s (knobs flat, by name)."""
        changed = {name: getattr(self, name) for name in CONTROLS if getattr(self, name) != getattr(old, name)}
        return changed | {name: v for name, v in self.knobs.items() if old.knobs.get(name, object()) != v}
