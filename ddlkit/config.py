"""RunConfig: one experiment, validated before any process starts, serialisable.

The same config travels to every worker (as JSON), to the CLI (YAML or JSON) and into ``runs/<id>/config.json``.

The fields below are common to every strategy. A strategy's own fields (the
parameter server's ``sync``, the pipeline's ``micro_batches``, ...) are knobs
declared in its file (``ddlkit.registry``); RunConfig accepts them as keyword
arguments and attributes like the common ones.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import limits, network, registry
from .common import COMMON, DATASETS, DEVICES, MODELS, OPTIMIZERS
from .files import write_atomic
from .knobs import check_faults, check_stragglers, require
from .speeds import check_speeds
from .yaml12 import YamlDumper, YamlLoader, yaml

__all__ = ["RunConfig", "MODELS", "DATASETS", "OPTIMIZERS", "DEVICES", "COMPATIBLE", "unknown_fields"]

# Which model can learn which dataset: cnn needs images, lm needs text.
COMPATIBLE = {"mlp": ("digits", "synthetic", "regression"), "cnn": ("digits",), "lm": ("sonnets",)}
PLUGINS = "plugins"  # the key naming the modules of strategies from outside ddlkit, in a config file


@dataclass(init=False, eq=False)
class RunConfig:
    """One experiment. Every value is checked as it is set (a typo fails at
    once, with the nearest valid value); :meth:`validate` checks how the fields
    fit together. Defaults, checks and help: ``ddlkit.common``.

    >>> cfg = RunConfig(strategy="ps", world_size=3, sync="bsp", steps=20)
    >>> cfg.validate()
    >>> cfg.sync, RunConfig.from_dict(cfg.to_dict()) == cfg
    ('bsp', True)
    >>> RunConfig(strategy="pipeline", world_size=4).pp  # one stage per rank
    4
    >>> RunConfig(strategy="pipline")
    Traceback (most recent call last):
    ...
    ValueError: strategy='pipline' is invalid: valid values are [...] (did you mean 'pipeline'?)
    """

    strategy: str
    world_size: int
    model: str
    dataset: str
    steps: int
    batch_size: int  # per data-parallel replica
    lr: float
    optimizer: str
    seed: int
    device: str
    log_every: int
    # Lockstep strategies time the wait for the slowest peer (idle_s) apart from transfer (transfer_s) on every
    # `time_every`-th step (the same steps on every rank): docs/load-balancing.md.
    time_every: int
    run_dir: str
    # A rank that makes no step for this many seconds is declared hung (its
    # first step gets at least 60 s: start-up can be slow).
    hang_timeout: float
    # Teaching and testing: make one rank fail on purpose, e.g.
    # {"rank": 1, "step": 5, "kind": "exception"}; kind is one of FAULT_KINDS.
    # Optional "attempt" (default 0): the fault fires only in that attempt, so a
    # restarted run does not fail again at the same step. A list of such dicts
    # injects several faults (e.g. one per attempt).
    fault: dict[str, Any] | list[dict[str, Any]] | None
    # Fault tolerance (ddlkit.checkpoint, ddlkit.kernel.resume): save the
    # training state every `checkpoint_every` steps (None: never), keep the
    # newest `keep_checkpoints`; restart all ranks from the newest checkpoint up
    # to `max_restarts` times when one dies or hangs.
    checkpoint_every: int | None
    keep_checkpoints: int
    max_restarts: int
    # Model size knobs, read by ddlkit.models.
    hidden: int
    seq_len: int
    # Threads per rank (torch intra-op); None: the cores divided by the ranks.
    threads: int | None
    # Stragglers (every strategy): slow chosen ranks by a factor, e.g. {1: 3.0}
    # (live: run.control(slowdown=...)); add fixed seconds per step to chosen
    # ranks, e.g. {2: 0.3} (a scripted schedule); add a random exponential
    # delay of this mean to every rank's steps (seeded by seed and rank).
    slowdown: dict[int, float] | None
    delay_s: dict[int, float] | None
    delay_jitter_s: float
    # Heterogeneous ranks, any strategy: relative compute speeds ({1: 0.5}) or a device profile (ddlkit.speeds).
    speeds: dict[int, float] | None
    rank_profile: str | None
    # More CPU ranks than limits.RANKS_PER_CORE per core (they then mostly wait for a core).
    oversubscribe: bool
    # Held-out evaluation, any strategy: every `eval_every` steps (rounds) an `eval` event with the loss and accuracy
    # on ddlkit.data.HELD_OUT of the data, which no rank then trains on (None: no evaluation, every sample trains).
    eval_every: int | None
    network: str | dict[str, float]  # between the ranks: ddlkit.network (live: run.control(network=...))

    def __init__(self, **values: Any) -> None:
        object.__setattr__(self, "knobs", {})
        for knob in COMMON.values():
            object.__setattr__(self, knob.name, knob.default)
        for name, value in values.items():
            setattr(self, name, value)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("slowdown", "delay_s", "speeds") and isinstance(value, dict):
            # JSON and YAML files give rank keys as strings: {"1": 3.0} means {1: 3.0}
            value = {int(k) if isinstance(k, str) and k.isdigit() else k: v for k, v in value.items()}
        if name == "run_dir" and isinstance(value, os.PathLike):
            value = os.fspath(value)  # a pathlib.Path is welcome; the config keeps plain, serialisable values
        if name in COMMON:
            require(COMMON[name].problem(value))
            object.__setattr__(self, name, value)
        elif (knob := registry.knob(name)) is not None:
            require(knob.problem(value))
            self.knobs[name] = value
        else:
            raise ValueError(unknown_fields([name]))

    def __getattr__(self, name: str) -> Any:
        # Only called for names that are not common fields: a strategy's knob,
        # as set, else as the strategy derives it (pipeline: pp = world_size), else its default.
        knob = registry.knob(name) if not name.startswith("__") else None
        if knob is None:
            raise AttributeError(f"RunConfig has no field {name!r}")
        if name in self.__dict__["knobs"]:
            return self.__dict__["knobs"][name]
        return self.derived().get(name, knob.default)

    def derived(self) -> dict[str, Any]:
        """The knobs the strategy derives from the other fields (pipeline: pp = world_size), unless set."""
        spec = _spec_or_none(self.strategy)
        derived = spec.derived(self) if spec is not None else {}
        return {name: value for name, value in derived.items() if name not in self.knobs}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RunConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"RunConfig({', '.join(f'{k}={v!r}' for k, v in self.to_dict().items())})"

    # ---- validation -------------------------------------------------------
    def validate(self) -> None:
        """Raise one ValueError naming the field, the value and what is valid."""
        for knob in COMMON.values():  # again: a field may have been changed behind __setattr__'s back
            require(knob.problem(getattr(self, knob.name)))
        spec = registry.get(self.strategy)
        if self.dataset not in COMPATIBLE[self.model]:
            raise ValueError(
                f"model={self.model!r} cannot train on dataset={self.dataset!r}: "
                f"valid datasets for {self.model!r} are {list(COMPATIBLE[self.model])}"
            )
        limits.check_device(self.device, self.resolved_device(), self.world_size, self.strategy, spec.cpu_only)
        limits.check_ranks(self.world_size, self.resolved_device(), self.oversubscribe, self.threads)
        check_faults(self.faults(), self.world_size, self.steps, self.max_restarts)
        check_stragglers(self.slowdown, self.delay_s, self.delay_jitter_s, self.world_size)
        require(network.problem(self.network, self.resolved_device()))
        check_speeds(self.speeds, self.rank_profile, self.world_size)
        self._validate_knobs(spec)
        if self.checkpoint_every is not None and spec.checkpoint is None:
            able = [name for name in registry.names() if registry.get(name).checkpoint]
            raise ValueError(
                f"checkpoint_every={self.checkpoint_every} is invalid for strategy={self.strategy!r}: "
                f"checkpoints are written by the strategies {able}; "
                "use checkpoint_every=None (restarts then begin again at step 0)"
            )
        spec.layout(self)
        limits.check_batch(self.batch_size, spec.dp_size(self), self.dataset, self.seq_len)

    def _validate_knobs(self, spec: registry.StrategySpec) -> None:
        """Every knob set must be valid, and read by the chosen strategy unless left at its default."""
        mine = {knob.name for knob in spec.knobs}
        for name, value in self.knobs.items():
            knob = registry.knob(name)
            assert knob is not None  # __setattr__ admits knobs only
            require(knob.problem(value))
            if name not in mine and value != knob.default:
                raise ValueError(
                    f"{name}={value!r} is invalid for strategy={self.strategy!r}: it is read by "
                    f"{registry.readers(name)}; leave it at {knob.default!r} or pick one of those"
                )

    def resolved_device(self) -> str:
        """'cpu' or 'cuda': what 'auto' means on this machine."""
        if self.device != "auto":
            return self.device
        import torch  # deferred: config stays cheap to import

        return "cuda" if torch.cuda.is_available() else "cpu"

    def faults(self) -> list[dict[str, Any]]:
        """``fault`` as a list (it may be one fault or several)."""
        return self.fault if isinstance(self.fault, list) else [self.fault] if self.fault else []

    # ---- serialisation ----------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Common fields, then the knobs of the strategy (and any set explicitly)."""
        data = {name: getattr(self, name) for name in _COMMON}
        spec = _spec_or_none(self.strategy)
        derived = self.derived()  # not written: they follow the fields they derive from
        for knob in spec.knobs if spec else ():
            if knob.name not in derived:
                data[knob.name] = getattr(self, knob.name)
        data.update(self.knobs)
        if spec is not None and not registry.is_built_in(spec):
            data[PLUGINS] = [spec.module]
        return json.loads(json.dumps(data))  # plain values only: lists, not tuples; string keys

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        data = dict(data)
        for module in data.pop(PLUGINS, None) or []:  # strategies from outside ddlkit register on import
            importlib.import_module(module)
        unknown = [name for name in data if name not in _COMMON and registry.knob(name) is None]
        if unknown:
            raise ValueError(unknown_fields(unknown))
        return cls(**data)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write as YAML (.yaml/.yml) or JSON (anything else)."""
        path = Path(path)
        data = self.to_dict()
        yaml_file = path.suffix in (".yaml", ".yml")
        text = yaml.dump(data, Dumper=YamlDumper, sort_keys=False) if yaml_file else json.dumps(data, indent=2)
        write_atomic(path, lambda f: f.write(text.encode()))  # whole or absent, even on a full disk

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> RunConfig:
        """Read a YAML or JSON file written by :meth:`save` (or by hand)."""
        path = Path(path)
        data = json.loads(path.read_text()) if path.suffix == ".json" else yaml.load(path.read_text(), YamlLoader)
        if not isinstance(data, dict):
            raise ValueError(f"{path} does not hold a mapping of config fields")
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> RunConfig:
        """A copy with ``changes``."""
        copy = RunConfig(**{name: getattr(self, name) for name in _COMMON})
        copy.knobs.update(self.knobs)
        for name, value in changes.items():
            setattr(copy, name, value)
        return copy

    def for_strategy(self, strategy: str) -> RunConfig:
        """A copy for ``strategy`` that keeps only the knobs that strategy reads
        and does not derive (a pipeline's pp follows its world_size)."""
        copy = self.replace(strategy=strategy)
        spec = _spec_or_none(strategy)
        readable = {knob.name for knob in spec.knobs} - set(spec.derived(copy)) if spec else set()
        for name in [name for name in copy.knobs if name not in readable]:
            del copy.knobs[name]
        return copy

    knobs: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)


_COMMON = tuple(f.name for f in dataclasses.fields(RunConfig) if f.name != "knobs")


def unknown_fields(names: list[str]) -> str:
    """The message for fields RunConfig does not have, with the nearest ones.

    >>> unknown_fields(["stpes"]).split(":")[0]
    "unknown config field(s) ['stpes'] (did you mean 'steps'?)"
    """
    valid = [*_COMMON, *registry.knob_names()]
    near = [match for name in names for match in difflib.get_close_matches(name, valid, n=1)]
    hint = f" (did you mean {', '.join(map(repr, near))}?)" if near else ""
    return f"unknown config field(s) {names}{hint}: valid fields are {sorted(valid)}"


def _spec_or_none(name: str) -> registry.StrategySpec | None:
    try:
        return registry.get(name)
    except ValueError:
        return None


def common_fields() -> tuple[str, ...]:
    """The fields every strategy has, in order."""
    return _COMMON
