"""Cutting a model into pipeline stages: the model as a flat list of layers,
and the cut points that balance the stages.

>>> balanced_cuts([10, 0, 10, 0, 10, 10], 2)
[3]
"""

from __future__ import annotations

import torch
from torch import nn

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


def balanced_cuts(sizes: list[int], stages: int) -> list[int]:
    """Cut points (index of each stage's first layer, after the first stage)
    that make the largest stage's parameter count as small as possible; each
    stage gets at least one layer.

    >>> balanced_cuts([10, 0, 10, 0, 10, 10], 2)
    [3]
    """
    n = len(sizes)
    prefix = [0]
    for size in sizes:
        prefix.append(prefix[-1] + size)
    # best[s][i]: (largest stage, cuts) for layers i.. split into s stages
    best: dict[tuple[int, int], tuple[int, list[int]]] = {(1, i): (prefix[n] - prefix[i], []) for i in range(n)}
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
