"""Local SGD and DiLoCo: sync less often.

Every rank trains its own copy of the model on its shard for ``sync_every``
(H) steps with the inner optimizer, talking to no one; then the ranks
all-reduce their parameters once. With ``outer="average"`` the average
becomes every rank's model (local SGD; H=1 with plain SGD is exactly ``data``).
With ``outer="nesterov"`` it is DiLoCo (Douillard et al. 2023): the averaged
change since the last sync, ``anchor - average``, is an outer gradient for
SGD with Nesterov momentum (``outer_lr`` 0.7, ``outer_momentum`` 0.9, the
paper's values) on the anchor, the model as of the last sync. Either way a run
sends H times fewer bytes than data parallelism for the same steps.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from ..config import RunConfig
from ..knobs import Knob, Widget, choice, integer, is_number, number
from ..rank.strategy import OptimizerFactory, RankContext, StepStats, Strategy, local_step
from ..registry import StrategySpec, register

OUTER = ("average", "nesterov")


class LocalSGD(Strategy):
    def __init__(
        self, cfg: RunConfig, accelerator: Any, model: torch.nn.Module, task: str, make_optimizer: OptimizerFactory
    ):
        self.cfg, self.task = cfg, task
        self.model = model.to(accelerator.device)
        self.optimizer = make_optimizer(self.model.parameters())
        self.dp_rank, self.dp_size = accelerator.process_index, accelerator.num_processes
        self.local_steps = 0  # since the last sync
        self.anchor = parameters_to_vector(self.model.parameters()).detach().clone()
        self.outer = torch.optim.SGD(
            [self.anchor], lr=cfg.outer_lr, momentum=cfg.outer_momentum, nesterov=cfg.outer_momentum > 0
        )

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> StepStats:
        start = time.perf_counter()
        loss = local_step(self.model, self.task, self.optimizer, inputs, targets)
        self.local_steps += 1
        comm_s = self.sync() if self.local_steps >= self.cfg.sync_every else 0.0
        elapsed = time.perf_counter() - start
        return StepStats(loss, compute_s=max(elapsed - comm_s, 0.0), comm_s=comm_s)

    def sync(self) -> float:
        """All-reduce the parameters and take the outer step; returns the seconds spent communicating."""
        params = list(self.model.parameters())
        mean = parameters_to_vector(params).detach()
        started = time.perf_counter()
        if self.dp_size > 1:
            dist.all_reduce(mean)
            mean /= self.dp_size
        comm_s = time.perf_counter() - started
        if self.cfg.outer == "nesterov":
            self.anchor.grad = self.anchor - mean  # the outer gradient: how far the average moved, negated
            self.outer.step()
            mean = self.anchor.detach()
        else:
            self.anchor.copy_(mean)
        vector_to_parameters(mean.clone(), params)
        self.local_steps = 0
        return comm_s

    def finish(self, ctx: RankContext) -> dict[str, Any]:
        if self.local_steps:  # steps since the last sync: sync them too, so every rank ends with one model
            self.sync()
        return {}

    def on_knobs(self, changed: dict[str, Any]) -> None:
        for group in self.outer.param_groups:
            group["lr"], group["momentum"] = self.cfg.outer_lr, self.cfg.outer_momentum
            group["nesterov"] = self.cfg.outer_momentum > 0

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's model (after the last sync, the same on every rank)."""
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}


register(
    StrategySpec(
        "local_sgd",
        LocalSGD,
        "local SGD / DiLoCo: ranks train alone for sync_every steps, then average (or take an outer Nesterov step)",
        knobs=(
            integer("sync_every", 10, 1, "sync every", "steps between parameter averages (H)", live=True),
            choice("outer", "average", OUTER, "outer step", "average the models, or DiLoCo's outer Nesterov step"),
            number("outer_lr", 0.7, 0.0, "outer lr", "DiLoCo's outer learning rate", up_to=10.0, live=True),
            Knob(
                "outer_momentum",
                0.9,
                lambda v: is_number(v) and 0 <= v < 1,
                "a number in [0, 1)",
                Widget("float", "outer momentum", 0.0, 0.99),
                "DiLoCo's outer Nesterov momentum (0: plain outer SGD)",
                live=True,
            ),
        ),
        position=7,
    )
)
