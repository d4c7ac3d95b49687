"""The checkpoint contract of every lockstep strategy: the whole training
state, portable between strategies and world sizes.

What a checkpoint holds is what one process training the same model would
hold: the model's state and the optimizer's state (Adam's moments and step
counts), whole, on CPU, keyed by the single-process parameter names
(``0.weight``, ``blocks.1.q.bias``). So a run checkpointed as data(2) goes on
as pipeline(2), tensor(2), fsdp(2) or data(1) from the same weights and the
same optimizer state: ``Run.relaunch`` switches layouts this way.

torch's ``get_state_dict`` / ``set_state_dict`` (full state dicts) read and
write it through DDP, FSDP2 and DTensor (tensor parallel) models: sharded
tensors are gathered on save and sliced again on load. A pipeline stage holds
only some of the model's parameters, under its own names; it maps them back
by identity (the stage modules are the model's own layers) and the stages
gather their parts (:func:`gathered`).

>>> import torch
>>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU(), torch.nn.Linear(2, 1))
>>> adam = torch.optim.Adam(model.parameters())
>>> model(torch.ones(1, 2)).sum().backward(); adam.step()
>>> state = whole_state(model, adam)
>>> sorted(state["model"]), sorted(state["optimizer"]["state"])
(['0.bias', '0.weight', '2.bias', '2.weight'], ['0.bias', '0.weight', '2.bias', '2.weight'])
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

# Save: gathered whole, on CPU (rank 0 keeps it; the others get empty dicts). Load: every rank reads the whole file.
SAVE = StateDictOptions(full_state_dict=True, cpu_offload=True)
LOAD = StateDictOptions(full_state_dict=True)


def whole_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Model and optimizer state, whole, under single-process names. A
    collective for sharded models: every rank calls it; rank 0's is complete."""
    model_state, optimizer_state = get_state_dict(model, optimizer, options=SAVE)
    return {"model": model_state, "optimizer": optimizer_state}


def load_whole_state(model: nn.Module, optimizer: torch.optim.Optimizer | None, state: dict[str, Any]) -> None:
    """The reverse, on every rank from the same whole state: each rank keeps
    its shards (and an optimizer over part of the model takes its part; a
    pipeline stage of parameter-free layers has none)."""
    saved = state["optimizer"]
    if saved["state"] and optimizer is not None:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=saved, options=LOAD)
        return
    # A stateless optimizer (plain SGD) has no tensor to place: torch's loader
    # refuses it ("Expected device to be set"), so set the model, then the settings.
    set_model_state_dict(model, state["model"], options=LOAD)
    if optimizer is None:  # a pipeline stage of parameter-free layers: nothing to set
        return
    for group, saved_group in zip(optimizer.param_groups, saved["param_groups"], strict=True):
        group.update({key: value for key, value in saved_group.items() if key != "params"})


class WholeState:
    """The checkpoint contract for a strategy whose ``model`` is the whole
    model (plain, DDP, FSDP2 or tensor parallel) and ``optimizer`` its optimizer."""

    model: nn.Module
    optimizer: Any

    def checkpoint_state(self) -> dict[str, Any]:
        return whole_state(self.model, _torch_optimizer(self.optimizer))

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        load_whole_state(self.model, _torch_optimizer(self.optimizer), state)


def _torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """accelerate wraps the torch optimizer (data, single): torch's state-dict functions want the optimizer itself."""
    inner: torch.optim.Optimizer = getattr(optimizer, "optimizer", optimizer)
    return inner


def gathered(model: nn.Module, optimizer: torch.optim.Optimizer | None, group: dist.ProcessGroup) -> dict[str, Any]:
    """For ranks that each train part of ``model`` (pipeline stages): every
    rank's parameters and their optimizer state, gathered over ``group`` into
    the whole state (every rank of the group gets it)."""
    optimizer_state: dict[str, Any] = (  # mine, by model names; none for a stage of parameter-free layers
        dict(get_optimizer_state_dict(model, optimizer)) if optimizer is not None else {"state": {}, "param_groups": []}
    )
    owned = {name for group_ in optimizer_state["param_groups"] for name in group_["params"]}
    mine = {
        "model": {name: p.detach().cpu().clone() for name, p in model.named_parameters() if name in owned},
        "optimizer": optimizer_state,
    }
    gathered_parts: list[dict[str, Any] | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered_parts, mine, group=group)
    parts = [part for part in gathered_parts if part is not None]
    order = list(model.state_dict())  # the single-process order of the names
    weights = {name: value for part in parts for name, value in part["model"].items()}
    states = {name: value for part in parts for name, value in part["optimizer"]["state"].items()}
    hyper = next(  # the same on every stage that has parameters
        {k: v for k, v in group_.items() if k != "params"}
        for part in parts
        for group_ in part["optimizer"]["param_groups"]
    )
    return {
        "model": {name: weights[name] for name in order},
        "optimizer": {"state": states, "param_groups": [{**hyper, "params": [n for n in order if n in weights]}]},
    }
