"""RunConfig: one experiment, validated before any process starts, serialisable.

The same config travels to every worker (as JSON), to the CLI (YAML or JSON)
and into ``runs/<id>/config.json``, so a run can always be reproduced.

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

import yaml

from . import registry
from .knobs import (
    check_faults,
    check_stragglers,
    choice_problem,
    is_int,
    non_negative_int,
    optional,
    positive_int,
    positive_number,
    problem,
    require,
)
from .network import problem as network_problem

MODELS = ("mlp", "cnn", "lm")
DATASETS = ("digits", "synthetic", "regression", "sonnets")
OPTIMIZERS = ("sgd", "adam", "adamw")
DEVICES = ("auto", "cpu", "cuda")
# Which model can learn which dataset: cnn needs images, lm needs text.
COMPATIBLE = {"mlp": ("digits", "synthetic", "regression"), "cnn": ("digits",), "lm": ("sonnets",)}
PLUGINS = "plugins"  # the key naming the modules of strategies from outside ddlkit, in a config file


@dataclass(init=False, eq=False)
class RunConfig:
    """One experiment.

    >>> cfg = RunConfig(strategy="ps", world_size=3, sync="bsp", steps=20)
    >>> cfg.validate()
    >>> cfg.sync, RunConfig.from_dict(cfg.to_dict()) == cfg
    ('bsp', True)
    """

    strategy: str = "data"
    world_size: int = 2
    model: str = "mlp"
    dataset: str = "digits"
    steps: int = 200
    batch_size: int = 32  # per data-parallel replica
    lr: float = 0.05
    optimizer: str = "sgd"
    seed: int = 0
    device: str = "auto"
    log_every: int = 1
    run_dir: str = "runs"
    # A rank that makes no step for this many seconds is declared hung (its
    # first step gets at least 60 s: start-up can be slow).
    hang_timeout: float = 120.0
    # Teaching and testing: make one rank fail on purpose, e.g.
    # {"rank": 1, "step": 5, "kind": "exception"}; kind is one of FAULT_KINDS.
    # Optional "attempt" (default 0): the fault fires only in that attempt, so a
    # restarted run does not fail again at the same step. A list of such dicts
    # injects several faults (e.g. one per attempt).
    fault: dict[str, Any] | list[dict[str, Any]] | None = None
    # Fault tolerance (ddlkit.checkpoint, ddlkit.kernel.resume): save the
    # training state every `checkpoint_every` steps (None: never), keep the
    # newest `keep_checkpoints`; restart all ranks from the newest checkpoint up
    # to `max_restarts` times when one dies or hangs.
    checkpoint_every: int | None = None
    keep_checkpoints: int = 2
    max_restarts: int = 0
    # Model size knobs, read by ddlkit.models.
    hidden: int = 128
    seq_len: int = 32
    # Threads per rank (torch intra-op); None: the cores divided by the ranks.
    threads: int | None = None
    # Stragglers (every strategy): slow chosen ranks by a factor, e.g. {1: 3.0}
    # (live: run.control(slowdown=...)); add fixed seconds per step to chosen
    # ranks, e.g. {2: 0.3} (a scripted schedule); add a random exponential
    # delay of this mean to every rank's steps (seeded by seed and rank).
    slowdown: dict[int, float] | None = None
    delay_s: dict[int, float] | None = None
    delay_jitter_s: float = 0.0
    # Held-out evaluation, any strategy: every `eval_every` steps (rounds) an `eval` event with the loss and accuracy
    # on ddlkit.data.HELD_OUT of the data, which no rank then trains on (None: no evaluation, every sample trains).
    eval_every: int | None = None
    # Between the ranks (ddlkit.network): "loopback", a preset or {"latency_ms": ..., "bandwidth_gbps": ...}; each
    # collective and message takes the alpha-beta model's time on top of loopback's. Live: run.control(network=...).
    network: str | dict[str, float] = "loopback"

    def __init__(self, **values: Any) -> None:
        object.__setattr__(self, "knobs", {})
        for name, value in values.items():
            setattr(self, name, value)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("slowdown", "delay_s") and isinstance(value, dict):
            # JSON and YAML files give rank keys as strings: {"1": 3.0} means {1: 3.0}
            value = {int(k) if isinstance(k, str) and k.isdigit() else k: v for k, v in value.items()}
        if name in _COMMON:
            object.__setattr__(self, name, value)
        elif registry.knob(name) is not None:
            self.knobs[name] = value
        else:
            raise ValueError(unknown_fields([name]))

    def __getattr__(self, name: str) -> Any:
        # Only called for names that are not common fields: a strategy's knob.
        knob = registry.knob(name) if not name.startswith("__") else None
        if knob is None:
            raise AttributeError(f"RunConfig has no field {name!r}")
        return self.__dict__["knobs"].get(name, knob.default)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RunConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"RunConfig({', '.join(f'{k}={v!r}' for k, v in self.to_dict().items())})"

    # ---- validation -------------------------------------------------------
    def validate(self) -> None:
        """Raise one ValueError naming the field, the value and what is valid."""
        for name, options in (("model", MODELS), ("dataset", DATASETS), ("optimizer", OPTIMIZERS), ("device", DEVICES)):
            require(choice_problem(name, getattr(self, name), options))
        spec = registry.get(self.strategy)
        for name in ("world_size", "steps", "batch_size", "log_every", "hidden", "seq_len", "keep_checkpoints"):
            require(problem(name, getattr(self, name), positive_int, "a positive integer"))
        require(problem("threads", self.threads, optional(positive_int), "a positive integer (or None: cores / ranks)"))
        for name in ("checkpoint_every", "eval_every"):
            require(problem(name, getattr(self, name), optional(positive_int), "a positive integer (or None)"))
        require(
            problem(
                "max_restarts", self.max_restarts, non_negative_int, "an integer >= 0 (0: a failed rank fails the run)"
            )
        )
        for name in ("lr", "hang_timeout"):
            require(problem(name, getattr(self, name), positive_number, "a positive number"))
        require(problem("seed", self.seed, is_int, "an integer"))
        if self.dataset not in COMPATIBLE[self.model]:
            raise ValueError(
                f"model={self.model!r} cannot train on dataset={self.dataset!r}: "
                f"valid datasets for {self.model!r} are {list(COMPATIBLE[self.model])}"
            )
        self._validate_device(spec)
        check_faults(self.faults(), self.world_size, self.steps, self.max_restarts)
        check_stragglers(self.slowdown, self.delay_s, self.delay_jitter_s, self.world_size)
        require(network_problem(self.network, self.resolved_device() if self.network != "loopback" else "cpu"))
        self._validate_knobs(spec)
        if self.checkpoint_every is not None and spec.checkpoint is None:
            able = [name for name in registry.names() if registry.get(name).checkpoint]
            raise ValueError(
                f"checkpoint_every={self.checkpoint_every} is invalid for strategy={self.strategy!r}: "
                f"checkpoints are written by the strategies {able}; "
                "use checkpoint_every=None (restarts then begin again at step 0)"
            )
        spec.layout(self)

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

    def _validate_device(self, spec: registry.StrategySpec) -> None:
        if self.device == "cpu":
            return
        import torch  # deferred: config stays cheap to import

        gpus = torch.cuda.device_count()
        if self.device == "cuda" and gpus == 0:
            raise ValueError("device='cuda' is invalid: no CUDA device is visible; valid here: 'cpu' or 'auto'")
        if self.resolved_device() == "cuda" and spec.cpu_only:
            raise ValueError(
                f"strategy={self.strategy!r} is invalid on device='cuda': it runs on CPU processes "
                "(any-source recv, shared memory); valid: device='cpu'"
            )
        if self.resolved_device() == "cuda" and self.world_size > gpus:
            raise ValueError(
                f"world_size={self.world_size} is invalid on device={self.device!r}: "
                f"only {gpus} GPU(s) are visible; valid: 1..{gpus}, or device='cpu'"
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
        for knob in spec.knobs if spec else ():
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
        if path.suffix in (".yaml", ".yml"):
            path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        else:
            path.write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> RunConfig:
        """Read a YAML or JSON file written by :meth:`save` (or by hand)."""
        path = Path(path)
        data = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
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
        """A copy for ``strategy`` that keeps only the knobs that strategy reads."""
        copy = self.replace(strategy=strategy)
        spec = _spec_or_none(strategy)
        readable = {knob.name for knob in spec.knobs} if spec else set()
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
