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

STRATEGIES = ("single", "data")
MODEL_PARALLEL = ("pipeline", "tensor", "fsdp", "hybrid")  # ddlkit/strategies/hybrid.py builds their mesh
STRATEGIES += MODEL_PARALLEL
SCHEDULES = ("gpipe", "1f1b", "interleaved")
# How many pipeline layers each built-in model has (ddlkit.strategies.pipeline.pipeline_layers)
PIPELINE_LAYERS = {"mlp": 5, "cnn": 10, "lm": 4}
LM_HEADS = 4  # attention heads of the built-in lm (ddlkit.models.CharTransformer)
MODELS = ("mlp", "cnn", "lm")
DATASETS = ("digits", "synthetic", "regression", "sonnets")
OPTIMIZERS = ("sgd", "adam", "adamw")
DEVICES = ("auto", "cpu", "cuda")
FAULT_KINDS = ("exception", "exit", "sigkill", "hang")

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
    fault: dict[str, Any] | None = None
    # Model size knobs, read by ddlkit.models.
    hidden: int = 128
    seq_len: int = 32
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
        valid = "a dict like {'rank': 1, 'step': 5, 'kind': 'exception'}"
        if not isinstance(self.fault, dict) or set(self.fault) != {"rank", "step", "kind"}:
            raise ValueError(f"fault={self.fault!r} is invalid: it must be {valid}")
        if not 0 <= int(self.fault["rank"]) < self.world_size:
            raise ValueError(f"fault rank={self.fault['rank']!r} is invalid: valid ranks are 0..{self.world_size - 1}")
        if not 0 <= int(self.fault["step"]) < self.steps:
            raise ValueError(f"fault step={self.fault['step']!r} is invalid: valid steps are 0..{self.steps - 1}")
        _one_of("fault kind", self.fault["kind"], FAULT_KINDS)

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
