"""Cutting a model into pipeline stages: the model as a flat list of layers,
and the cut points that balance the stages, by parameter count or, with
``cut_points="auto"``, by each layer's measured forward + backward time.

>>> balanced_cuts([10, 0, 10, 0, 10, 10], 2)
[3]
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from .. import events
from ..config import RunConfig
from ..data import load_dataset
from ..models import CharTransformer

# How many pipeline layers each built-in model has (``pipeline_layers``; a test checks the table).
LAYERS = {"mlp": 5, "cnn": 10, "lm": 4}


class Embed(nn.Module):
    """The lm's first pipeline layer: token plus position embeddings (the
    model's own modules, so parameter names and values are shared)."""

    def __init__(self, model: CharTransformer):
        super().__init__()
        self.tok, self.pos = model.tok, model.pos

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.tok(ids) + self.pos[: ids.shape[1]]


class Head(nn.Module):
    """The lm's last pipeline layer: final norm and the vocabulary projection."""

    def __init__(self, model: CharTransformer):
        super().__init__()
        self.norm, self.head = model.norm, model.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(x))


def pipeline_layers(model: nn.Module) -> list[nn.Module]:
    """The model as a flat list of layers, the units a cut falls between.

    >>> pipeline_layers(nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)))[1]
    ReLU()
    """
    if isinstance(model, CharTransformer):
        return [Embed(model), *model.blocks, Head(model)]
    if isinstance(model, nn.Sequential):
        return list(model)
    raise ValueError(f"{type(model).__name__} cannot be pipelined: give an nn.Sequential or a CharTransformer")


def balanced_cuts(sizes: Sequence[float], stages: int) -> list[int]:
    """Cut points (index of each stage's first layer, after the first stage)
    that make the largest stage's total (parameters, or seconds) as small as
    possible: the classic linear partition. Each stage gets at least one layer.

    >>> balanced_cuts([10, 0, 10, 0, 10, 10], 2)
    [3]
    >>> balanced_cuts([0.1, 3.0, 3.0, 0.5], 2)  # seconds: one block per stage
    [2]
    """
    n = len(sizes)
    prefix = [0.0]
    for size in sizes:
        prefix.append(prefix[-1] + size)
    # best[s][i]: (largest stage, cuts) for layers i.. split into s stages
    best: dict[tuple[int, int], tuple[float, list[int]]] = {(1, i): (prefix[n] - prefix[i], []) for i in range(n)}
    for s in range(2, stages + 1):
        for i in range(n - s + 1):
            best[s, i] = min(
                (
                    (max(prefix[j] - prefix[i], best[s - 1, j][0]), [j] + best[s - 1, j][1])
                    for j in range(i + 1, n - s + 2)
                ),
                key=lambda choice: (choice[0], choice[1]),
            )
    return best[stages, 0][1]


def stage_totals(sizes: Sequence[float], cuts: Sequence[int]) -> list[float]:
    """Each stage's total of ``sizes`` under ``cuts``.

    >>> stage_totals([1.0, 2.0, 3.0, 4.0], [1, 3])
    [1.0, 5.0, 4.0]
    """
    bounds = [0, *cuts, len(sizes)]
    return [float(sum(sizes[bounds[k] : bounds[k + 1]])) for k in range(len(bounds) - 1)]


def layer_times(layers: Sequence[nn.Module], example: torch.Tensor, reps: int = 5) -> list[float]:
    """Each layer's forward + backward seconds on ``example`` (one micro-batch
    through the layers in order), the median of ``reps`` runs after a warm-up.
    The gradients it makes are dropped: training is unchanged.

    >>> times = layer_times(pipeline_layers(nn.Sequential(nn.Linear(8, 512), nn.ReLU(), nn.Linear(512, 2))),
    ...                     torch.randn(64, 8))
    >>> len(times), times[0] > 0
    (3, True)
    """
    runs: list[list[float]] = []
    for _ in range(reps + 1):
        x, times = example, []
        for layer in layers:
            x = x.detach().requires_grad_(x.is_floating_point())
            start = time.perf_counter()
            y = layer(x)
            if y.requires_grad:
                y.backward(torch.ones_like(y))
            times.append(time.perf_counter() - start)
            x = y
        runs.append(times)
    for layer in layers:
        for p in layer.parameters():
            p.grad = None
    return [statistics.median(run[k] for run in runs[1:]) for k in range(len(layers))]


def choose_cuts(
    cfg: RunConfig, layers: Sequence[nn.Module], stages: int, param_cuts: list[int]
) -> tuple[list[int], events.Cuts | None]:
    """The config's cuts: given, by parameter count (None), or ``"auto"``:
    those that minimise the slowest stage's measured time, with a ``cuts``
    event comparing them to the parameter-count cuts. Every rank profiles a
    micro-batch of the data and the times are averaged over all ranks, so every
    rank (every replica of a hybrid) cuts the same. ``param_cuts``: the
    schedule's cuts by parameter count."""
    if cfg.cut_points != "auto":
        return list(cfg.cut_points or param_cuts), None
    example = load_dataset(cfg.dataset, cfg.seed, cfg.seq_len).inputs[: cfg.batch_size // cfg.micro_batches]
    times = torch.tensor(layer_times(layers, example), dtype=torch.float64)
    dist.all_reduce(times)
    layer_s = (times / dist.get_world_size()).tolist()
    cuts = balanced_cuts(layer_s, stages)
    report = events.Cuts(
        type="cuts",
        layer_s=layer_s,
        cuts=cuts,
        param_cuts=param_cuts,
        stage_s=stage_totals(layer_s, cuts),
        param_stage_s=stage_totals(layer_s, param_cuts),
    )
    return cuts, report
