"""Held-out evaluation: a model's loss and accuracy on samples no rank trains on.

With ``eval_every`` set, the rank loop splits the dataset once
(``ddlkit.data.held_out_split``, a pure function of the seed): every rank trains
on the rest, and one rank (its strategy's ``evaluator``, rank 0 unless the
spec says otherwise) measures the whole model on the held-out samples every
``eval_every`` steps (a serving strategy: rounds), before the first and after
the last, and sends an ``eval`` event. ``step`` in the event counts the steps
(rounds) done when it was measured. Accuracy is the share of correct
classes (of correct next characters, for ``lm``); regression has none.

The model measured is a copy made before the strategy wrapped, cut or sharded
the original, loaded with the strategy's ``full_state_dict()``.

>>> import torch
>>> from ddlkit.data import load_dataset, subset
>>> from ddlkit.models import build_model
>>> data = load_dataset("digits")
>>> model = build_model("mlp", data, hidden=16)
>>> held_out = HeldOut(model, subset(data, torch.arange(100)))
>>> event = held_out.event(0, model.state_dict())
>>> event["type"], event["samples"], 0.0 <= event["accuracy"] <= 1.0
('eval', 100, True)
>>> [due(done, every=5, last=12) for done in (0, 3, 5, 12)]
[True, False, True, True]
"""

from __future__ import annotations

import copy

import torch

from .. import events
from ..data import Dataset
from ..models import loss_fn

BATCH = 2048  # samples per forward pass while measuring


def due(done: int, every: int | None, last: int) -> bool:
    """Measure after ``done`` steps (rounds)? Every ``every`` (None: never), and at the ``last``."""
    return every is not None and (done % every == 0 or done == last)


class HeldOut:
    """The held-out samples and a private copy of the model to measure them with."""

    def __init__(self, model: torch.nn.Module, data: Dataset):
        self.model = copy.deepcopy(model)
        self.data = data

    @torch.no_grad()
    def measure(self, state: dict[str, torch.Tensor]) -> tuple[float, float | None]:
        """Mean loss and accuracy (None for regression) of the model with ``state``."""
        self.model.load_state_dict(state)
        loss_sum, correct, total = 0.0, 0, 0
        inputs, targets, task = self.data.inputs, self.data.targets, self.data.task
        for start in range(0, len(inputs), BATCH):
            x, y = inputs[start : start + BATCH], targets[start : start + BATCH]
            out = self.model(x)
            loss_sum += loss_fn(task, out, y).item() * len(x)
            if task != "regress":
                correct += int((out.argmax(-1) == y).sum())
                total += y.numel()
        return loss_sum / len(inputs), (correct / total if total else None)

    def event(self, done: int, state: dict[str, torch.Tensor]) -> events.Eval:
        loss, accuracy = self.measure(state)
        event = events.Eval(type="eval", step=done, loss=loss, samples=len(self.data))
        if accuracy is not None:
            event["accuracy"] = accuracy
        return event
