"""The strategy registry: which strategies exist and what each one declares.

Every module in ``ddlkit/strategies/`` that defines a strategy registers a
:class:`StrategySpec` when imported; the registry imports them all the first
time it is asked, so a new parallelism is one new file there. A strategy
defined elsewhere (a test, a user's package) registers the same way and
travels to the workers by its module name (``RunConfig`` records it).

``RunConfig.validate()``, the ControlPanel, the CLI, live relaunches and the
checkpointer ask the registry; none of them lists strategies by name.

>>> spec = get("data")
>>> spec.name, spec.checkpoint, spec.lockstep
('data', 'consolidated', True)
>>> get("pipline")
Traceback (most recent call last):
...
ValueError: strategy='pipline' is invalid: valid values are [...] (did you mean 'pipeline'?)
"""

from __future__ import annotations

import importlib
import pkgutil
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .knobs import Knob, choice_problem

BUILT_IN = "ddlkit.strategies"
CHECKPOINT_LAYOUTS = (None, "consolidated", "sharded")


def _any_layout(cfg: Any) -> None:
    """The default layout rule: every world size works."""


def _every_rank(cfg: Any) -> int:
    """The default data-parallel size: every rank is a replica."""
    return int(cfg.world_size)


def _nothing_derived(cfg: Any) -> dict[str, Any]:
    """The default: no knob follows from the other fields."""
    return {}


def _rank_zero(cfg: Any) -> int:
    return 0


def _config_steps(cfg: Any) -> int:
    return int(cfg.steps)


def _one(cfg: Any) -> int:
    return 1


@dataclass(frozen=True)
class StrategySpec:
    """What a strategy file declares about itself.

    - ``build(cfg, accelerator, model, task, make_optimizer)``: the strategy
      object of this rank (see ``ddlkit.rank.strategy.Strategy``).
    - ``knobs``: the config fields it reads besides the common ones.
    - ``layout(cfg)``: raise one ValueError for a layout that cannot work.
    - ``dp_size(cfg)``: how many data-parallel replicas; the global batch is
      ``batch_size * dp_size(cfg)`` (kept when a run is relaunched in a new layout).
    - ``derived(cfg)``: knobs that follow from the other fields unless set
      (a pipeline's ``pp`` is its ``world_size``); the panel hides them.
    - ``checkpoint``: None (no checkpoints), "consolidated" (rank 0 saves the
      whole state; any layout resumes) or "sharded" (every rank its own part).
    - ``portable``: the checkpoint is the whole model and optimizer state under
      single-process names (``ddlkit.strategies.state``), so a run can be
      relaunched between any two portable strategies.
    - ``lockstep``: ranks step together, so live changes are agreed by a collective.
    - ``cpu_only``: it needs CPU processes (any-source receives, shared memory).
    - ``position``: where menus list it (lower first).
    - ``evaluator(cfg)``: the rank that measures the held-out data (``eval_every``):
      one whose ``full_state_dict()`` is the whole model at its steps.
    - ``length(cfg)``: the steps (a round-based strategy: rounds) a run takes; progress bars end there.
    - ``accumulation(cfg)``: micro-batches of ``batch_size`` one step takes on each replica (gradient accumulation).
    """

    name: str
    build: Callable[..., Any]
    about: str
    knobs: tuple[Knob, ...] = ()
    layout: Callable[[Any], None] = _any_layout
    dp_size: Callable[[Any], int] = _every_rank
    derived: Callable[[Any], dict[str, Any]] = _nothing_derived
    checkpoint: str | None = None
    portable: bool = False
    lockstep: bool = True
    cpu_only: bool = False
    position: int = 100
    evaluator: Callable[[Any], int] = _rank_zero
    length: Callable[[Any], int] = _config_steps
    accumulation: Callable[[Any], int] = _one
    module: str = field(default="", compare=False)


_specs: dict[str, StrategySpec] = {}
_lock = threading.RLock()
_discovered = False


def register(spec: StrategySpec) -> StrategySpec:
    """Add (or replace) a strategy; returns the spec with its module recorded."""
    if spec.checkpoint not in CHECKPOINT_LAYOUTS:
        raise ValueError(f"checkpoint={spec.checkpoint!r} is invalid: valid values are {list(CHECKPOINT_LAYOUTS)}")
    spec = replace(spec, module=spec.module or spec.build.__module__)
    with _lock:
        _specs[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    with _lock:
        _specs.pop(name, None)


def names() -> list[str]:
    """Every registered strategy, in menu order."""
    _discover()
    return [spec.name for spec in sorted(_specs.values(), key=lambda spec: spec.position)]


def get(name: str) -> StrategySpec:
    """The spec of ``name``, or one ValueError listing the valid names."""
    _discover()
    if name not in _specs:
        raise ValueError(choice_problem("strategy", name, names()))
    return _specs[name]


def knob(name: str) -> Knob | None:
    """The knob called ``name`` (the first strategy to declare it), if any."""
    _discover()
    return next((k for spec in list(_specs.values()) for k in spec.knobs if k.name == name), None)


def knob_names() -> list[str]:
    _discover()
    return list(dict.fromkeys(k.name for spec in list(_specs.values()) for k in spec.knobs))


def readers(knob_name: str) -> list[str]:
    """The strategies that read a knob."""
    _discover()
    return [spec.name for spec in list(_specs.values()) if any(k.name == knob_name for k in spec.knobs)]


def is_built_in(spec: StrategySpec) -> bool:
    return spec.module.startswith(BUILT_IN + ".")


def _discover() -> None:
    """Import every module of ``ddlkit/strategies/`` once: each registers its strategy."""
    global _discovered
    if _discovered:
        return
    with _lock:
        if _discovered:
            return
        folder = Path(__file__).parent / "strategies"
        for module in sorted(pkgutil.iter_modules([str(folder)]), key=lambda m: m.name):
            importlib.import_module(f"{BUILT_IN}.{module.name}")
        _discovered = True
