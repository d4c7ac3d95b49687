"""Gradient compression for data parallelism: which DDP communication hook
sends the gradients, and its knobs.

torch's own hooks do fp16 and bf16 (cast, all-reduce, cast back) and PowerSGD
(low-rank P and Q factors, with error feedback); top-k with error feedback is
the one written here, as torch has none: each rank sends its ``topk_ratio``
largest gradient entries (values and int32 indices, by all-gather), every rank
adds them up, and what was not sent is kept and added to the next step's
gradient (error feedback), so nothing is lost, only late.

The ``comm`` events count what these hooks hand to the process group: the
compressed sizes.

>>> hook_for(Options("topk", topk_ratio=0.5))[1].__name__
'topk_hook'
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

from ..knobs import Knob, Widget, choice, flag, integer, is_number

COMPRESSIONS = ("none", "fp16", "bf16", "powersgd", "topk")
# torch's PowerSGD hook starts its next all-reduces from the callbacks of the previous ones. With several DDP
# buckets those callbacks run on different gloo threads, and the ranks then start the buckets' all-reduces in
# different orders: measured here, a deadlock with gloo's 2 threads and "collective mismatch" with 8. So a
# PowerSGD run keeps its gradients in one bucket (DDP's first bucket is otherwise capped at 1 MB).
ONE_BUCKET_MB = 1024

KNOBS = (
    choice(
        "compression",
        "none",
        COMPRESSIONS,
        "compression",
        "how gradients are sent: plain all-reduce, fp16/bf16 casts, PowerSGD low rank, or top-k sparse",
    ),
    integer("powersgd_rank", 2, 1, "PowerSGD rank", "rank of PowerSGD's gradient approximation", up_to=64),
    Knob(
        "topk_ratio",
        0.01,
        lambda v: is_number(v) and 0 < v <= 1,
        "a number in (0, 1]",
        Widget("float", "top-k ratio", 0.0001, 1.0),
        "fraction of gradient entries top-k sends each step",
    ),
    flag("error_feedback", True, "error feedback", "keep what compression did not send and add it to the next step"),
)


@dataclass
class Options:
    """The compression knobs of a config (any object with these attributes works too)."""

    compression: str = "none"
    powersgd_rank: int = 2
    topk_ratio: float = 0.01
    error_feedback: bool = True


def check(cfg: Any) -> None:
    """Refuse what cannot run, before launch."""
    if cfg.compression == "bf16" and cfg.resolved_device() == "cpu":
        raise ValueError(
            "compression='bf16' is invalid on CPU ranks: torch's bf16_compress_hook needs CUDA and NCCL "
            "(gloo cannot all-reduce bfloat16); valid on CPU: 'none', 'fp16', 'powersgd', 'topk'"
        )


class TopK:
    """Top-k state: the ratio, and per bucket what error feedback keeps."""

    def __init__(self, ratio: float, error_feedback: bool, group: dist.ProcessGroup | None = None):
        self.ratio = ratio
        self.error_feedback = error_feedback
        self.group = group  # None: the whole world (DDP's default group)
        self.residuals: dict[int, torch.Tensor] = {}


def topk_hook(state: TopK, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Send the largest ``ratio`` of the bucket's entries; the mean over ranks of what was sent comes back."""
    grad, n = bucket.buffer(), dist.get_world_size(state.group)
    residual = state.residuals.get(bucket.index())
    wanted = grad + residual if residual is not None and residual.shape == grad.shape else grad.clone()
    k = max(1, math.ceil(state.ratio * wanted.numel()))
    index = wanted.abs().topk(k, sorted=False).indices
    values = wanted[index]
    if state.error_feedback:
        wanted[index] = 0.0
        state.residuals[bucket.index()] = wanted  # what was not sent waits for the next step
    all_values, all_index = values.new_empty(n * k), torch.empty(n * k, dtype=torch.int32, device=grad.device)
    dist.all_gather_single(all_values, values, group=state.group)
    dist.all_gather_single(all_index, index.to(torch.int32), group=state.group)
    total = torch.zeros_like(grad).index_add_(0, all_index.long(), all_values)
    done: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    done.set_result(total.div_(n))
    return done


def hook_for(options: Any, group: dist.ProcessGroup | None = None) -> tuple[Any, Any]:
    """(state, hook) for DDP's ``register_comm_hook`` as the knobs say, averaging over ``group``
    (None: the whole world)."""
    kind = options.compression
    if kind == "fp16":
        return group, default_hooks.fp16_compress_hook
    if kind == "bf16":
        return group, default_hooks.bf16_compress_hook
    if kind == "powersgd":
        state = powerSGD_hook.PowerSGDState(
            process_group=group,
            matrix_approximation_rank=options.powersgd_rank,
            start_powerSGD_iter=2,  # torch's least with error feedback: two plain steps first
            use_error_feedback=options.error_feedback,
        )
        return state, powerSGD_hook.powerSGD_hook
    if kind == "topk":
        return TopK(options.topk_ratio, options.error_feedback, group), topk_hook
    return group, default_hooks.allreduce_hook


class FlatBucket:
    """What torch's hooks read of a ``dist.GradBucket``, over one flat buffer of gradients of ``shapes``."""

    def __init__(self, flat: torch.Tensor, shapes: list[torch.Size]):
        self.flat = flat
        parts = flat.split([shape.numel() for shape in shapes])
        self.views = [part.view(shape) for part, shape in zip(parts, shapes, strict=True)]

    def index(self) -> int:
        return 0

    def is_last(self) -> bool:
        return True

    def buffer(self) -> torch.Tensor:
        return self.flat

    def gradients(self) -> list[torch.Tensor]:
        return self.views


class BucketAverager:
    """The compressed mean over a hybrid layout's data-parallel replicas. No DDP can wrap a pipeline
    stage or a tensor-parallel shard, so the strategy averages its gradients itself
    (``sharding.average_gradients``), as one bucket through the hook the knobs choose; the hook's
    state (PowerSGD's factors, top-k's residuals) lasts from step to step."""

    def __init__(self, options: Any, group: dist.ProcessGroup | None):
        self.state, self.hook = hook_for(options, group)

    def __call__(self, flat: torch.Tensor, shapes: list[torch.Size]) -> torch.Tensor:
        return self.hook(self.state, FlatBucket(flat, shapes)).wait()


def averager_for(cfg: Any, dp_group: dist.ProcessGroup | None) -> BucketAverager | None:
    """A hybrid layout's compressed averaging, if its knobs ask for compression."""
    return BucketAverager(cfg, dp_group) if dp_group is not None and cfg.compression != "none" else None
