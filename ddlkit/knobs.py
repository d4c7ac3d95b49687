"""Knobs: the RunConfig fields a strategy adds, each described once.

A knob says its default, which values are valid (a check and the same in
words, for the error message), and how a widget sets it. The strategy file
that reads a knob declares it; ``RunConfig`` accepts it, ``validate()`` checks
it, the ControlPanel draws it and the CLI makes a flag of it, all from this
one description.

>>> micro = Knob("micro_batches", 4, positive_int, "a positive integer", Widget("int", "micro-batches", 1, 1024))
>>> micro.problem(0)
'micro_batches=0 is invalid: it must be a positive integer'
>>> micro.problem(8) is None
True
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Widget:
    """How the ControlPanel sets a knob: ``kind`` is "int", "float", "choice"
    or "bool"; ``low``/``high`` bound numbers, ``options`` lists choices;
    ``none_as`` is what the widget shows for the value None (e.g. 0 for "off")."""

    kind: str
    label: str
    low: float | None = None
    high: float | None = None
    options: tuple[Any, ...] = ()
    none_as: Any = None


@dataclass(frozen=True)
class Knob:
    """One config field: name, default, check, the check in words, widget, help,
    and whether it can change live."""

    name: str
    default: Any
    check: Callable[[Any], bool]
    valid: str
    widget: Widget | None = None
    help: str = ""
    live: bool = False  # may change while the run goes on (``Run.control``), applied at a step all ranks agree on

    def problem(self, value: Any) -> str | None:
        """The error message for ``value``, or None if it is valid (for a
        choice: with the nearest option, when the value looks like a typo)."""
        if self.widget is not None and self.widget.kind == "choice" and self.widget.options:
            return choice_problem(self.name, value, self.widget.options)
        return problem(self.name, value, self.check, self.valid)


def integer(
    name: str,
    default: int | None,
    low: int,
    label: str | None,
    help: str,
    up_to: int = 1_000_000,
    allow_none: bool = False,
    live: bool = False,
) -> Knob:
    """An integer knob ``>= low`` (or None, with ``allow_none``); ``label`` None: no widget.

    >>> integer("servers", 1, 1, "servers", "ranks that serve").problem(0)
    'servers=0 is invalid: it must be a positive integer'
    """
    valid = ("None or " if allow_none else "") + ("a positive integer" if low == 1 else f"an integer >= {low}")
    check: Callable[[Any], bool] = lambda value: is_int(value) and value >= low  # noqa: E731
    widget = Widget("int", label, low, up_to) if label is not None else None
    return Knob(name, default, optional(check) if allow_none else check, valid, widget, help, live)


def number(
    name: str, default: float, low: float, label: str | None, help: str, up_to: float = 1e6, live: bool = False
) -> Knob:
    """A finite number knob ``>= low``; ``label`` None: no widget."""
    widget = Widget("float", label, low, up_to) if label is not None else None
    check: Callable[[Any], bool] = lambda value: is_number(value) and value >= low  # noqa: E731
    return Knob(name, default, check, f"a number >= {low:g}", widget, help, live)


def choice(name: str, default: Any, options: Sequence[Any], label: str, help: str, live: bool = False) -> Knob:
    """A knob that takes one of ``options``."""
    widget = Widget("choice", label, options=tuple(options))
    return Knob(name, default, one_of(options), f"one of {list(options)}", widget, help, live)


def flag(name: str, default: bool, label: str | None, help: str, live: bool = False) -> Knob:
    """A True/False knob; ``label`` None: no widget."""
    return Knob(name, default, boolean, "True or False", Widget("bool", label) if label else None, help, live)


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def positive_int(value: Any) -> bool:
    return is_int(value) and value >= 1


def within(low: int, high: int) -> Callable[[Any], bool]:
    """An integer low..high (both included)."""
    return lambda value: is_int(value) and low <= value <= high


def non_negative_int(value: Any) -> bool:
    return is_int(value) and value >= 0


def non_negative_number(value: Any) -> bool:
    return is_number(value) and value >= 0


def positive_number(value: Any) -> bool:
    return is_number(value) and value > 0


def one_of(options: Sequence[Any]) -> Callable[[Any], bool]:
    return lambda value: value in options


def optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    """None, or a value ``check`` accepts."""
    return lambda value: value is None or check(value)


def boolean(value: Any) -> bool:
    return isinstance(value, bool)


def choice_problem(name: str, value: Any, options: Sequence[Any]) -> str | None:
    """The message for a value that is not one of ``options``, with the
    nearest option when the value looks like a typo.

    >>> choice_problem("strategy", "pipline", ["data", "pipeline"])
    "strategy='pipline' is invalid: valid values are ['data', 'pipeline'] (did you mean 'pipeline'?)"
    """
    if value in options:
        return None
    message = f"{name}={value!r} is invalid: valid values are {list(options)}"
    near = difflib.get_close_matches(str(value), [str(o) for o in options], n=1) if isinstance(value, str) else []
    return message + (f" (did you mean {near[0]!r}?)" if near else "")


FAULT_KINDS = ("exception", "exit", "sigkill", "sigstop", "hang")


def check_faults(faults: list[Any], world_size: int, steps: int, max_restarts: int) -> None:
    """Each fault a dict like {'rank': 1, 'step': 5, 'kind': 'exception'} aimed at a rank and step that exist."""
    valid = "a dict like {'rank': 1, 'step': 5, 'kind': 'exception'} (optionally with 'attempt': 0), or a list of them"
    for fault in faults:
        if not isinstance(fault, dict) or not {"rank", "step", "kind"} <= set(fault) <= {
            "rank",
            "step",
            "kind",
            "attempt",
        }:
            raise ValueError(f"fault={fault!r} is invalid: it must be {valid}")
        if not is_int(fault["rank"]) or not 0 <= fault["rank"] < world_size:
            raise ValueError(f"fault rank={fault['rank']!r} is invalid: valid ranks are 0..{world_size - 1}")
        if not is_int(fault["step"]) or not 0 <= fault["step"] < steps:
            raise ValueError(f"fault step={fault['step']!r} is invalid: valid steps are 0..{steps - 1}")
        require(choice_problem("fault kind", fault["kind"], FAULT_KINDS))
        attempt = fault.get("attempt", 0)
        if not is_int(attempt) or not 0 <= attempt <= max_restarts:
            raise ValueError(
                f"fault attempt={attempt!r} is invalid: with max_restarts={max_restarts} "
                f"valid attempts are 0..{max_restarts}"
            )


def check_stragglers(slowdown: Any, delay_s: Any, jitter_s: Any, world_size: int) -> None:
    for name, value, smallest, meaning in (
        ("slowdown", slowdown, 1, "a factor >= 1"),
        ("delay_s", delay_s, 0, "seconds >= 0"),
    ):
        if value is None:
            continue
        if not isinstance(value, dict) or not all(
            is_int(r) and 0 <= r < world_size and is_number(f) and f >= smallest for r, f in value.items()
        ):
            raise ValueError(
                f"{name}={value!r} is invalid: it must be a dict {{rank: {meaning}}} with ranks 0..{world_size - 1}"
            )
    require(problem("delay_jitter_s", jitter_s, non_negative_number, "seconds >= 0"))


def problem(name: str, value: Any, check: Callable[[Any], bool], valid: str) -> str | None:
    """The message for a field whose value ``check`` refuses, or None."""
    return None if check(value) else f"{name}={value!r} is invalid: it must be {valid}"


def require(message: str | None) -> None:
    """Raise a ValueError with ``message``, if there is one."""
    if message is not None:
        raise ValueError(message)
