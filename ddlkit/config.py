"""RunConfig: one experiment, validated before any process starts, serialisable.

The same config travels to every worker (as JSON), to the CLI (YAML or JSON)
and into ``runs/<id>/config.json``, so a run can always be reproduced.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

STRATEGIES = ("single", "data", "ps", "hogwild")
MODEL_PARALLEL = ("pipeline", "tensor", "fsdp", "hybrid")  # ddlkit/strategies/hybrid.py builds their mesh
STRATEGIES += MODEL_PARALLEL
# Strategies that implement the checkpoint contract (ddlkit.strategies docstring).
CHECKPOINTABLE = ("single", "data")
SCHEDULES = ("gpipe", "1f1b", "interleaved")
# How many pipeline layers each built-in model has (ddlkit.strategies.pipeline.pipeline_layers)
PIPELINE_LAYERS = {"mlp": 5, "cnn": 10, "lm": 4}
LM_HEADS = 4  # attention heads of the built-in lm (ddlkit.models.CharTransformer)
MODELS = ("mlp", "cnn", "lm")
DATASETS = ("digits", "synthetic", "regression", "sonnets")
OPTIMIZERS = ("sgd", "adam", "adamw")
DEVICES = ("auto", "cpu", "cuda")
FAULT_KINDS = ("exception", "exit", "sigkill", "hang")
SYNC_MODES = ("bsp", "async", "ssp")  # parameter-server consistency (ddlkit.strategies.ps)

# Which model can learn which dataset: cnn needs images, lm needs text.
COMPATIBLE = {
    "mlp": ("digits", "synthetic", "regression"),
    "cnn": ("digits",),
    "lm": ("sonnets",),
}


@dataclass
class RunConfig:
    """One experiment.

    >>> cfg = RunConfig(strategy="data", world_size=2, steps=20)
    >>> cfg.validate()
    >>> RunConfig.from_dict(cfg.to_dict()) == cfg
    True
    """

    strategy: str = "data"
    world_size: int = 2
    model: str = "mlp"
    dataset: str = "digits"
    steps: int = 200
    batch_size: int = 32  # per rank
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
    # Fault tolerance (ddlkit.checkpoint, ddlkit.elastic): save the training
    # state every `checkpoint_every` steps (None: never), keep the newest
    # `keep_checkpoints`; restart all ranks from the newest checkpoint up to
    # `max_restarts` times when one dies or hangs.
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
    # Parameter server (strategy "ps"): ranks 0..servers-1 serve parameter
    # shards, the others are workers. sync: bsp, async, or ssp with a worker at
    # most staleness_bound steps ahead of the slowest. staleness_lr divides a
    # gradient by its staleness; max_staleness (async) drops older gradients.
    servers: int = 1
    sync: str = "async"
    staleness_bound: int = 1
    staleness_lr: bool = False
    max_staleness: int | None = None

    # Model parallelism (strategies pipeline, tensor, fsdp, hybrid; see
    # ddlkit/strategies/hybrid.py). Degrees: pipeline needs pp == world_size,
    # tensor tp == world_size, hybrid dp * pp * tp == world_size with dp >= 2
    # and exactly one of pp, tp above 1; fsdp shards over all world_size ranks.
    dp: int = 1
    pp: int = 1
    tp: int = 1
    micro_batches: int = 4  # per step, per pipeline; must divide batch_size
    schedule: str = "1f1b"  # one of SCHEDULES; "interleaved" gives each rank 2 stages
    # Index of the first layer of every stage but the first, e.g. [2] cuts an
    # mlp's 5 layers into 0-1 | 2-4; None balances stages by parameter count.
    cut_points: list[int] | None = None
    # Teaching: seconds each pipeline stage sleeps per micro-batch forward
    # (twice that per backward), so the timeline shows the schedule, not noise.
    stage_delay: float = 0.0

    def __post_init__(self) -> None:
        # JSON and YAML files give rank keys as strings: {"1": 3.0} means {1: 3.0}
        for name in ("slowdown", "delay_s"):
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, {int(k) if isinstance(k, str) and k.isdigit() else k: v for k, v in value.items()})

    # ---- validation -------------------------------------------------------
    def validate(self) -> None:
        """Raise one ValueError naming the field, the value and what is valid."""
        _one_of("strategy", self.strategy, STRATEGIES)
        _one_of("model", self.model, MODELS)
        _one_of("dataset", self.dataset, DATASETS)
        _one_of("optimizer", self.optimizer, OPTIMIZERS)
        _one_of("device", self.device, DEVICES)
        for name in ("world_size", "steps", "batch_size", "log_every", "hidden", "seq_len"):
            _positive_int(name, getattr(self, name))
        if self.threads is not None:
            _positive_int("threads", self.threads)
        _positive_number("lr", self.lr)
        _positive_number("hang_timeout", self.hang_timeout)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed={self.seed!r} is invalid: it must be an integer")
        if self.dataset not in COMPATIBLE[self.model]:
            raise ValueError(
                f"model={self.model!r} cannot train on dataset={self.dataset!r}: "
                f"valid datasets for {self.model!r} are {list(COMPATIBLE[self.model])}"
            )
        if self.strategy == "single" and self.world_size != 1:
            raise ValueError(
                f"world_size={self.world_size} is invalid for strategy='single': it must be 1 "
                "(use strategy='data' for several processes)"
            )
        self._validate_device()
        self._validate_fault()
        self._validate_stragglers()
        self._validate_parameter_server()
        self._validate_fault_tolerance()
        self._validate_layout()

    def _validate_layout(self) -> None:
        """Model-parallel layouts that cannot work, refused before launch."""
        for name in ("dp", "pp", "tp", "micro_batches"):
            _positive_int(name, getattr(self, name))
        _one_of("schedule", self.schedule, SCHEDULES)
        if not isinstance(self.stage_delay, (int, float)) or isinstance(self.stage_delay, bool) or self.stage_delay < 0:
            raise ValueError(f"stage_delay={self.stage_delay!r} is invalid: it must be a number of seconds >= 0")
        if self.strategy not in MODEL_PARALLEL:
            if (self.dp, self.pp, self.tp) != (1, 1, 1):
                raise ValueError(f"dp={self.dp}, pp={self.pp}, tp={self.tp} is invalid for strategy={self.strategy!r}: "
                                 f"degrees are read by {list(MODEL_PARALLEL)}; leave them at 1 or pick one of those")
            return
        from .layout import check_layout  # deferred: the rules live beside the layouts

        check_layout(self)

    def _validate_device(self) -> None:
        if self.device == "cpu":
            return
        import torch  # deferred: config stays cheap to import

        gpus = torch.cuda.device_count()
        if self.device == "cuda" and gpus == 0:
            raise ValueError("device='cuda' is invalid: no CUDA device is visible; valid here: 'cpu' or 'auto'")
        if self.resolved_device() == "cuda" and self.world_size > gpus:
            raise ValueError(
                f"world_size={self.world_size} is invalid on device={self.device!r}: "
                f"only {gpus} GPU(s) are visible; valid: 1..{gpus}, or device='cpu'"
            )

    def _validate_fault(self) -> None:
        if self.fault is None:
            return
        valid = "a dict like {'rank': 1, 'step': 5, 'kind': 'exception'} (optionally with 'attempt': 0), or a list of them"
        for fault in self.fault if isinstance(self.fault, list) else [self.fault]:
            if not isinstance(fault, dict) or not {"rank", "step", "kind"} <= set(fault) <= {"rank", "step", "kind", "attempt"}:
                raise ValueError(f"fault={fault!r} is invalid: it must be {valid}")
            if not 0 <= int(fault["rank"]) < self.world_size:
                raise ValueError(f"fault rank={fault['rank']!r} is invalid: valid ranks are 0..{self.world_size - 1}")
            if not 0 <= int(fault["step"]) < self.steps:
                raise ValueError(f"fault step={fault['step']!r} is invalid: valid steps are 0..{self.steps - 1}")
            _one_of("fault kind", fault["kind"], FAULT_KINDS)
            attempt = fault.get("attempt", 0)
            if not isinstance(attempt, int) or isinstance(attempt, bool) or not 0 <= attempt <= self.max_restarts:
                raise ValueError(f"fault attempt={attempt!r} is invalid: with max_restarts={self.max_restarts} "
                                 f"valid attempts are 0..{self.max_restarts}")

    def _validate_fault_tolerance(self) -> None:
        if self.checkpoint_every is not None:
            _positive_int("checkpoint_every", self.checkpoint_every)
            if self.strategy not in CHECKPOINTABLE:
                raise ValueError(f"checkpoint_every={self.checkpoint_every} is invalid for strategy={self.strategy!r}: "
                                 f"checkpoints are written by the strategies {list(CHECKPOINTABLE)}; "
                                 "use checkpoint_every=None (restarts then begin again at step 0)")
        _positive_int("keep_checkpoints", self.keep_checkpoints)
        if not isinstance(self.max_restarts, int) or isinstance(self.max_restarts, bool) or self.max_restarts < 0:
            raise ValueError(f"max_restarts={self.max_restarts!r} is invalid: it must be an integer >= 0 "
                             "(0: a failed rank fails the run)")

    def _validate_stragglers(self) -> None:
        for name, smallest, meaning in (("slowdown", 1, "a factor >= 1"), ("delay_s", 0, "seconds >= 0")):
            value = getattr(self, name)
            if value is None:
                continue
            valid = f"a dict {{rank: {meaning}}} with ranks 0..{self.world_size - 1}"
            if not isinstance(value, dict) or not all(
                    isinstance(r, int) and 0 <= r < self.world_size and isinstance(f, (int, float))
                    and not isinstance(f, bool) and f >= smallest for r, f in value.items()):
                raise ValueError(f"{name}={value!r} is invalid: it must be {valid}")
        if not isinstance(self.delay_jitter_s, (int, float)) or not self.delay_jitter_s >= 0:
            raise ValueError(f"delay_jitter_s={self.delay_jitter_s!r} is invalid: it must be seconds >= 0")

    def _validate_parameter_server(self) -> None:
        _one_of("sync", self.sync, SYNC_MODES)
        _positive_int("servers", self.servers)
        if not isinstance(self.staleness_bound, int) or isinstance(self.staleness_bound, bool) or self.staleness_bound < 0:
            raise ValueError(f"staleness_bound={self.staleness_bound!r} is invalid: it must be an integer >= 0")
        if self.max_staleness is not None:
            if not isinstance(self.max_staleness, int) or isinstance(self.max_staleness, bool) or self.max_staleness < 0:
                raise ValueError(f"max_staleness={self.max_staleness!r} is invalid: it must be None or an integer >= 0")
            if self.sync != "async":
                raise ValueError(f"max_staleness={self.max_staleness} is invalid with sync={self.sync!r}: "
                                 "bsp and ssp bound staleness already; valid only with sync='async'")
        if self.strategy == "ps" and self.servers >= self.world_size:
            raise ValueError(f"servers={self.servers} is invalid with world_size={self.world_size}: "
                             f"at least one rank must be a worker; valid: 1..{self.world_size - 1}")
        if self.strategy in ("ps", "hogwild") and self.resolved_device() != "cpu":
            raise ValueError(f"strategy={self.strategy!r} is invalid on device='cuda': it runs on CPU processes "
                             "(any-source recv, shared memory); valid: device='cpu'")

    def resolved_device(self) -> str:
        """'cpu' or 'cuda': what 'auto' means on this machine."""
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    # ---- serialisation ----------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config field(s) {unknown}: valid fields are {sorted(known)}")
        return cls(**data)

    def save(self, path: str | os.PathLike) -> None:
        """Write as YAML (.yaml/.yml) or JSON (anything else)."""
        path = Path(path)
        if path.suffix in (".yaml", ".yml"):
            path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        else:
            path.write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "RunConfig":
        """Read a YAML or JSON file written by :meth:`save` (or by hand)."""
        path = Path(path)
        data = yaml.safe_load(path.read_text())  # JSON is valid YAML
        if not isinstance(data, dict):
            raise ValueError(f"{path} does not hold a mapping of config fields")
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> "RunConfig":
        return dataclasses.replace(self, **changes)


def _one_of(name: str, value: Any, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"{name}={value!r} is invalid: valid values are {list(valid)}")


def _positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r} is invalid: it must be a positive integer")


def _positive_number(name: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise ValueError(f"{name}={value!r} is invalid: it must be a positive number")
