"""Which model-parallel layouts can work: the rules ``RunConfig.validate()``
applies before any process starts, one clear ValueError per impossible layout.

>>> from ddlkit import RunConfig
>>> RunConfig(strategy="pipeline", world_size=2, pp=2, micro_batches=1).validate()
Traceback (most recent call last):
...
ValueError: micro_batches=1 is invalid for pp=2: a pipeline needs at least as many micro-batches as stages (valid: 2 or more dividing batch_size=32)
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import RunConfig


def check_layout(cfg: "RunConfig") -> None:
    from .config import LM_HEADS, PIPELINE_LAYERS

    _check_degrees(cfg)
    if cfg.pp > 1:
        stages = cfg.pp * (2 if cfg.schedule == "interleaved" else 1)
        layers = PIPELINE_LAYERS[cfg.model]
        if stages > layers:
            raise ValueError(
                f"pp={cfg.pp} with schedule={cfg.schedule!r} needs {stages} stages but model={cfg.model!r} has "
                f"only {layers} layers: valid pp for it is 2..{layers // (stages // cfg.pp)}")
        if cfg.micro_batches < cfg.pp or cfg.batch_size % cfg.micro_batches:
            raise ValueError(
                f"micro_batches={cfg.micro_batches} is invalid for pp={cfg.pp}: a pipeline needs at least as many "
                f"micro-batches as stages (valid: {cfg.pp} or more dividing batch_size={cfg.batch_size})")
        if cfg.schedule == "interleaved" and cfg.micro_batches % cfg.pp:
            raise ValueError(
                f"micro_batches={cfg.micro_batches} is invalid for schedule='interleaved' with pp={cfg.pp}: "
                f"it must be a multiple of pp")
        if cfg.cut_points is not None:
            _check_cut_points(cfg.cut_points, stages, layers)
    if cfg.tp > 1:
        if cfg.hidden % cfg.tp:
            raise ValueError(f"hidden={cfg.hidden} is invalid for tp={cfg.tp}: tensor parallelism splits the hidden "
                             f"features evenly, so hidden must be a multiple of tp")
        if cfg.model == "lm" and LM_HEADS % cfg.tp:
            raise ValueError(f"tp={cfg.tp} is invalid for model='lm': its {LM_HEADS} attention heads must split evenly "
                             f"over the tp ranks (valid tp: 1, 2, 4)")


def _check_degrees(cfg: "RunConfig") -> None:
    pp, tp, dp, n = cfg.pp, cfg.tp, cfg.dp, cfg.world_size
    if cfg.strategy == "pipeline" and (pp != n or pp < 2 or tp != 1 or dp != 1):
        raise ValueError(f"pp={pp}, tp={tp}, dp={dp} is invalid for strategy='pipeline' with world_size={n}: "
                         f"one stage per rank, so pp must equal world_size (>= 2) and tp = dp = 1 "
                         f"(strategy='hybrid' combines pp with dp)")
    if cfg.strategy == "tensor" and (tp != n or tp < 2 or pp != 1 or dp != 1):
        raise ValueError(f"pp={pp}, tp={tp}, dp={dp} is invalid for strategy='tensor' with world_size={n}: "
                         f"tp must equal world_size (>= 2) and pp = dp = 1 (strategy='hybrid' combines tp with dp)")
    if cfg.strategy == "fsdp" and (n < 2 or pp != 1 or tp != 1 or dp != 1):
        raise ValueError(f"world_size={n}, pp={pp}, tp={tp}, dp={dp} is invalid for strategy='fsdp': it shards "
                         f"over all ranks, so world_size >= 2 and pp = tp = dp = 1")
    if cfg.strategy == "hybrid":
        if dp * pp * tp != n:
            raise ValueError(f"dp={dp} x pp={pp} x tp={tp} = {dp * pp * tp} is invalid for world_size={n}: "
                             f"the degrees of the mesh must multiply to world_size")
        if dp < 2 or (pp > 1) == (tp > 1):
            raise ValueError(f"dp={dp}, pp={pp}, tp={tp} is invalid for strategy='hybrid': it is a 2-D mesh, "
                             f"dp >= 2 times exactly one of pp or tp >= 2 (dp x pp or dp x tp)")


def _check_cut_points(cuts: list[int], stages: int, layers: int) -> None:
    valid = (isinstance(cuts, list) and len(cuts) == stages - 1 and all(isinstance(c, int) for c in cuts)
             and list(cuts) == sorted(set(cuts)) and all(0 < c < layers for c in cuts))
    if not valid:
        raise ValueError(f"cut_points={cuts!r} is invalid: give {stages - 1} increasing layer indices "
                         f"in 1..{layers - 1} (where stages 2..{stages} start), or None to balance by parameters")
