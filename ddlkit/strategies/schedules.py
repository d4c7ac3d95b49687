"""The pipeline schedules torch 2.13 ships, the layout each needs, and a stage
that times its own work.

A schedule decides the order in which every rank runs each micro-batch's
forward (F) and backward on its stages. GPipe and 1F1B hold one stage per
rank; the others hold two (``v = 2``), either looped (rank r: stages r and
r + p) or in a V (rank r: stages r and 2p-1-r, so the last stage sits beside
the first on rank 0). The zero-bubble schedules split the backward into the
input gradient (I, which the previous stage waits for) and the weight
gradient (W, which nobody waits for) and slot the W's into the bubble.

>>> [SCHEDULES[name].stages_per_rank for name in ("1f1b", "zbv")]
[1, 2]
>>> stage_ids(0, 2, "interleaved"), stage_ids(0, 2, "zbv")
([0, 2], [0, 3])
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleDualPipeV,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
    ScheduleLoopedBFS,
    ScheduleZBVZeroBubble,
)

from .. import events
from ..config import RunConfig
from ..knobs import is_number
from .stages import LAYERS, balanced_cuts

# Each built-in model's pipeline layers (but the last) whose output is a view of their input (the cnn's
# reshapes; a test checks).
VIEW_LAYERS: dict[str, tuple[int, ...]] = {"mlp": (), "cnn": (0, 6), "lm": ()}


@dataclass(frozen=True)
class Schedule:
    """One torch schedule class and the layout it needs."""

    cls: type
    stages_per_rank: int
    shape: str  # "loop": rank r holds r, r+p, ...; "v": rank r holds r and 2p-1-r
    splits_backward: bool  # runs I and W apart (else one B per micro-batch)
    about: str


SCHEDULES = {
    "gpipe": Schedule(ScheduleGPipe, 1, "loop", False, "all forwards, then all backwards"),
    "1f1b": Schedule(Schedule1F1B, 1, "loop", False, "one forward, one backward after a warm-up"),
    "interleaved": Schedule(ScheduleInterleaved1F1B, 2, "loop", False, "1F1B over two looped stages per rank"),
    "looped_bfs": Schedule(ScheduleLoopedBFS, 2, "loop", False, "breadth first: a stage's every micro-batch at once"),
    "interleaved_zb": Schedule(
        ScheduleInterleavedZeroBubble, 2, "loop", True, "zero bubble (ZB1P): W's fill the bubble, looped stages"
    ),
    "zbv": Schedule(ScheduleZBVZeroBubble, 2, "v", True, "zero bubble ZB-V: two stages per rank in a V"),
    "dualpipev": Schedule(ScheduleDualPipeV, 2, "v", True, "DeepSeek's DualPipe cut in half: a V, F and B paired"),
}


def stage_ids(rank: int, pp: int, schedule: str) -> list[int]:
    """The stages ``rank`` of ``pp`` holds under ``schedule``, first first.

    >>> stage_ids(1, 2, "dualpipev"), stage_ids(1, 4, "looped_bfs")
    ([1, 2], [1, 5])
    """
    spec = SCHEDULES[schedule]
    if spec.shape == "v":
        return [rank, 2 * pp - 1 - rank]
    return [rank + k * pp for k in range(spec.stages_per_rank)]


def last_stage_rank(pp: int, schedule: str) -> int:
    """The pipeline rank that holds the last stage (it computes the loss).

    >>> last_stage_rank(4, "1f1b"), last_stage_rank(4, "zbv")
    (3, 0)
    """
    return 0 if SCHEDULES[schedule].shape == "v" else pp - 1


def check_micro_batches(cfg: RunConfig) -> None:
    """The micro-batch counts each schedule needs, refused with what would be valid."""
    p, m, name = cfg.pp, cfg.micro_batches, cfg.schedule
    if m < p or cfg.batch_size % m:
        raise ValueError(
            f"micro_batches={m} is invalid for pp={p}: a pipeline needs at least as many "
            f"micro-batches as stages (valid: {p} or more dividing batch_size={cfg.batch_size})"
        )
    if name in ("interleaved", "interleaved_zb") and m % p:
        raise ValueError(f"micro_batches={m} is invalid for schedule={name!r} with pp={p}: it must be a multiple of pp")
    if name == "dualpipev" and m < 2 * p:
        raise ValueError(
            f"micro_batches={m} is invalid for schedule='dualpipev' with pp={p}: it needs at least as many "
            f"micro-batches as its {2 * p} stages (valid: {2 * p} or more dividing batch_size={cfg.batch_size})"
        )


def check_split_backward(cfg: RunConfig) -> None:
    """With a split backward no stage may end with a layer whose output is a
    view of its input (the cnn's reshapes).

    torch 2.13's input-gradient step detaches the stage's output in place,
    which a view refuses; and a first stage of only a reshape sends an
    activation that needs no gradient, behind which the next stage's weight
    gradients come out wrong (both measured here; see ``PipelineStage.
    backward_weight_one_chunk``'s TODO). Default cuts keep each such layer
    with the layer after it.
    """
    if not SCHEDULES[cfg.schedule].splits_backward:
        return
    views, cuts = VIEW_LAYERS[cfg.model], cfg.cut_points
    stages = cfg.pp * SCHEDULES[cfg.schedule].stages_per_rank
    units = LAYERS[cfg.model] - len(views)
    if units < stages:
        raise ValueError(
            f"pp={cfg.pp} with schedule={cfg.schedule!r} needs {stages} stages, none ending with a reshape, but "
            f"model={cfg.model!r} has {units} layers once its reshapes {list(views)} go with the layer after: "
            f"valid pp for it is 2..{units // 2}"
        )
    bad = [c for c in cuts or [] if c - 1 in views]
    if bad:
        raise ValueError(
            f"cut_points={cuts!r} is invalid for schedule={cfg.schedule!r}: a stage may not end with a reshape "
            f"(model={cfg.model!r}'s layers {list(views)}), so no cut at {[v + 1 for v in views]}; "
            f"torch's split backward cannot run behind one"
        )


def default_cuts(sizes: list[int], stages: int, schedule: str, views: tuple[int, ...] = ()) -> list[int]:
    """Cuts balancing the stages' parameters; with a split backward each layer
    in ``views`` stays with the layer after it (see :func:`check_split_backward`).

    >>> cnn = [0, 160, 0, 4640, 0, 0, 0, 16416, 0, 330]  # parameters per layer
    >>> default_cuts(cnn, 4, "1f1b", (0, 6)), default_cuts(cnn, 4, "zbv", (0, 6))
    ([1, 4, 8], [2, 4, 8])
    >>> default_cuts(cnn, 8, "zbv", (0, 6))
    [2, 3, 4, 5, 6, 8, 9]
    """
    if not SCHEDULES[schedule].splits_backward:
        return balanced_cuts(sizes, stages)
    starts = [i for i in range(len(sizes)) if i - 1 not in views]  # where a unit of layers may begin
    units = [sum(sizes[a:b]) for a, b in zip(starts, [*starts[1:], len(sizes)], strict=True)]
    return [starts[cut] for cut in balanced_cuts(units, stages)]


def stage_costs_valid(value: Any) -> bool:
    """None, or [F, I, W]: three numbers >= 0, F above 0."""
    return value is None or (
        isinstance(value, (list, tuple))
        and len(value) == 3
        and all(is_number(c) and c >= 0 for c in value)
        and value[0] > 0
    )


class TimedStage(PipelineStage):
    """A ``PipelineStage`` that records a span for each forward, full backward
    (B), input-gradient backward (I) and weight-gradient backward (W) it runs.

    torch offers no hook that sees these actions: the runtime schedules call
    the stage's ``forward_one_chunk``, ``backward_one_chunk`` (``full_backward``
    False: I only) and ``backward_weight_one_chunk`` once per micro-batch, and
    GPipe/1F1B the first two. They are public but undocumented, so
    tests/test_schedules.py pins their signatures and torch 2.13.

    In teaching mode each also sleeps ``delay`` times its cost from ``costs``
    (F, I, W; a full backward costs I + W), standing in for real work.
    """

    def __init__(self, *args: Any, spans: list[events.Span], delay: float, costs: Sequence[float], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.spans, self.delay = spans, delay
        f, i, w = costs
        self.sleep = {"forward": f * delay, "backward": (i + w) * delay, "input": i * delay, "weight": w * delay}

    def _timed(self, phase: str, chunk: int, run: Any) -> Any:
        start = time.time()
        if self.sleep[phase]:
            time.sleep(self.sleep[phase])
        out = run()
        self.spans.append(
            events.Span(
                type="span", stage=self.stage_index, micro_batch=chunk, phase=phase, start=start, end=time.time()
            )
        )
        return out

    def forward_one_chunk(self, fwd_chunk_id: int, *args: Any, **kwargs: Any) -> Any:
        return self._timed(
            "forward", fwd_chunk_id, lambda: super(TimedStage, self).forward_one_chunk(fwd_chunk_id, *args, **kwargs)
        )

    def backward_one_chunk(
        self, bwd_chunk_id: int, loss: Any = None, full_backward: bool = True, last_backward: bool = False
    ) -> Any:
        return self._timed(
            "backward" if full_backward else "input",
            bwd_chunk_id,
            lambda: super(TimedStage, self).backward_one_chunk(bwd_chunk_id, loss, full_backward, last_backward),
        )

    def backward_weight_one_chunk(self, bwd_chunk_id: int, last_backward: bool = False) -> Any:
        return self._timed(
            "weight",
            bwd_chunk_id,
            lambda: super(TimedStage, self).backward_weight_one_chunk(bwd_chunk_id, last_backward),
        )
