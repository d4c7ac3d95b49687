"""Command-line flags for config fields, made from their knobs: every common
field (``ddlkit.common``) and every strategy's knob becomes ``--name-with-dashes``
with its help, what is valid and its default, so ``ddlkit run --help`` explains
every field the panel and the validation know.

A flag's text becomes the first reading the field accepts: JSON (``2``,
``1e-5``, ``[2, 4]``, ``null``), the shorthand for rank maps (``1:3`` or
``1=3,2=1.5``) and faults (``rank=1,step=5,kind=sigkill``), or the text itself.
A value no reading makes valid is passed on as typed, and validation says why.

>>> reading(COMMON["slowdown"], "1:3,2:1.5")
{1: 3.0, 2: 1.5}
>>> reading(COMMON["fault"], "rank=1,step=5,kind=sigkill")
{'rank': 1, 'step': 5, 'kind': 'sigkill'}
>>> reading(COMMON["run_dir"], "2024"), reading(COMMON["lr"], "1e-5"), reading(COMMON["checkpoint_every"], "off")
('2024', 1e-05, None)
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

from . import registry
from .common import COMMON
from .knobs import Knob

NONE_WORDS = ("none", "off", "null")
APPENDED = ("fault",)  # may be given several times: a list of them


def flag_of(name: str) -> str:
    return "--" + name.replace("_", "-")


def describe(knob: Knob, default: str) -> str:
    """A knob's help line: what it does, what is valid, its default."""
    options = knob.widget.options if knob.widget is not None and knob.widget.kind == "choice" else ()
    valid = f"one of {', '.join(map(str, options))}" if options else knob.valid
    text = f"{knob.help}. Valid: {valid}. Default: {default}"
    return text.replace("%", "%%")  # argparse formats help with %


def strategies_text() -> str:
    """Every registered strategy and what it does, for the help's end."""
    lines = [f"  {name:<10} {registry.get(name).about}" for name in registry.names()]
    return "\n".join(["strategies (--strategy):", *lines, "", VALUES])


VALUES = """values: JSON (2, 1e-5, [2, 4], null, true), or the shorthands
  --slowdown 1:3          rank 1 three times slower (several: 1:3,2:1.5)
  --delay-s 2:0.05        rank 2 sleeps 50 ms more per step
  --fault rank=1,step=5,kind=sigkill   (repeat --fault for several)
  --checkpoint-every off  None"""


def add_field_flags(parser: argparse.ArgumentParser) -> None:
    """A flag per common field, then one group per strategy for the knobs it reads first."""
    group = parser.add_argument_group("the experiment (every strategy)")
    for knob in COMMON.values():
        add_flag(group, knob, repr(knob.default))
    seen: set[str] = set()
    for name in registry.names():
        spec = registry.get(name)
        group = parser.add_argument_group(f"strategy {name!r}: {spec.about}")
        derived = spec.derived(_Fields())
        for knob in spec.knobs:
            if knob.name in seen:
                continue
            seen.add(knob.name)
            default = f"= {derived[knob.name]} for {name}" if knob.name in derived else repr(knob.default)
            others = [reader for reader in registry.readers(knob.name) if reader != name]
            help_knob = knob if not others else _with_help(knob, f"{knob.help} (also read by {', '.join(others)})")
            add_flag(group, help_knob, default)


def add_flag(group: Any, knob: Knob, default: str) -> None:
    options = knob.widget.options if knob.widget is not None and knob.widget.kind == "choice" else ()
    if knob.name == "strategy":
        options = tuple(registry.names())
    switch = isinstance(knob.default, bool)  # --oversubscribe alone means true
    group.add_argument(
        flag_of(knob.name),
        dest=knob.name,
        default=None,
        type=lambda text, _knob=knob: reading(_knob, text),
        action="append" if knob.name in APPENDED else "store",
        **({"nargs": "?", "const": True} if switch else {}),
        metavar="{" + ",".join(map(str, options)) + "}" if options else knob.name.upper(),
        help=describe(knob, default),
    )


def reading(knob: Knob, text: str) -> Any:
    """The first reading of ``text`` that ``knob`` accepts, else the likeliest one (validation then says why)."""
    readings = list(_readings(text))
    return next((value for value in readings if knob.problem(value) is None), readings[0])


def values(opts: argparse.Namespace) -> dict[str, Any]:
    """The fields given on the command line ({name: value}); repeated faults become a list."""
    given = {}
    for name in [*COMMON, *registry.knob_names()]:
        value = getattr(opts, name, None)
        if value is None:
            continue
        given[name] = (value[0] if len(value) == 1 else value) if name in APPENDED else value
    return given


def _readings(text: str) -> Iterator[Any]:
    try:
        yield json.loads(text)
    except ValueError:
        pass
    if text.strip().lower() in NONE_WORDS:
        yield None
    pairs = [part.replace("=", ":", 1).split(":", 1) for part in text.split(",")]
    if all(len(pair) == 2 for pair in pairs):
        keys = [key.strip() for key, _ in pairs]
        parsed = [_scalar(value.strip()) for _, value in pairs]
        if all(key.isdigit() for key in keys):  # a rank map: 1:3,2:1.5
            yield {
                int(key): float(value) if isinstance(value, int) else value
                for key, value in zip(keys, parsed, strict=True)
            }
        else:  # a fault: rank=1,step=5,kind=sigkill
            yield dict(zip(keys, parsed, strict=True))
    yield text


def _scalar(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _with_help(knob: Knob, help: str) -> Knob:
    return replace(knob, help=help)


class _Fields:
    """What a strategy's ``derived`` reads, for the help text: 'world_size' as a word."""

    def __getattr__(self, name: str) -> str:
        return name
