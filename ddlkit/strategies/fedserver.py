"""The federated server (not a strategy: what ``federated.py`` runs on rank
0): the rounds, one after the other, from a checkpoint if the run resumes;
the global model, its optimizer, SCAFFOLD's control variates, the privacy
accountant; and the events of each round.

SCAFFOLD's client control variates are kept here, by client (a real device
keeps its own; the simulation hands clients to whichever rank is free): that
is why scaffold is refused with secure aggregation and DP.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import torch

from .. import events, privacy
from ..checkpoint import Checkpointer
from ..devices import Devices
from ..rank.loop import checkpoint_event
from ..rank.strategy import RankContext, Strategy
from .clients import Setting, local_steps
from .fedplan import RoundPlan, assign, combine, make_server_optimizer, plan_round, server_update
from .fedwire import receive, send


class Server:
    def __init__(self, cfg: Any, model: torch.nn.Module, sizes: list[int], devices: Devices, ctx: RankContext):
        self.cfg, self.model, self.sizes, self.devices = cfg, model, sizes, devices
        self.params = list(model.parameters())
        self.size = sum(p.numel() for p in self.params)
        self.optimizer = make_server_optimizer(cfg.server_optimizer, self.params, cfg.server_lr)
        self.scaffold = cfg.algorithm == "scaffold"
        self.control = torch.zeros(self.size)  # SCAFFOLD's server control variate c
        self.client_controls: dict[int, torch.Tensor] = {}  # c_i, by client
        self.accountant = privacy.Accountant() if cfg.dp_noise_multiplier > 0 else None
        self.sim_total_s = 0.0
        self.samples = 0  # trained so far (local steps x batch)
        self.changed: dict[str, Any] = {}  # live knobs changed since the last round began

    # ---- the rounds ------------------------------------------------------------------------------
    def run(self, fed: Strategy, ctx: RankContext, stop_clients: Callable[[], None]) -> dict[str, Any]:
        """Every round from the checkpoint the kernel chose (if any); then the client ranks are told to stop."""
        cfg = self.cfg
        checkpoints = Checkpointer(cfg, fed, ctx.run_dir, 0, ctx.world_size) if cfg.checkpoint_every else None
        first, saved_lr = checkpoints.restore(os.environ.get("DDLKIT_RESUME")) if checkpoints else (0, None)
        ctx.lr = ctx.lr if saved_lr is None else saved_lr
        started, done = time.perf_counter(), first
        ctx.evaluate(first, fed)
        for round_ in range(first, cfg.rounds):
            if ctx.tick(round_, fed).stop:  # live knobs are on cfg from here: this round takes them
                break
            self.round(ctx, round_)
            done = round_ + 1
            ctx.evaluate(done, fed)
            if checkpoints and checkpoints.due(done) and done < cfg.rounds:
                checkpoint_event(ctx.reporter, checkpoints.save(done, ctx.lr), done)
        stop_clients()
        stopped = done < cfg.rounds
        if stopped:
            ctx.evaluate(done, fed, stopped=True)
            if checkpoints and not checkpoints.due(done):
                checkpoint_event(ctx.reporter, checkpoints.save(done, ctx.lr), done)  # keep this round's state
        return {"steps": done, "samples": self.samples, "train_s": time.perf_counter() - started, "stopped": stopped}

    def round(self, ctx: RankContext, round_: int) -> None:
        """Plan, hand out, collect, combine, step; then the round's events."""
        cfg, began = self.cfg, time.perf_counter()
        mu = cfg.mu if cfg.algorithm == "fedprox" else 0.0
        setting = Setting(round_, ctx.lr, cfg.local_epochs, cfg.local_batch, mu, self.scaffold)
        plan = plan_round(cfg, setting, self.devices, self.sizes, self.size)
        work = {c: plan.plans[c].steps * (cfg.local_batch or self.sizes[c]) for c in plan.sampled}
        jobs = assign(work, list(range(1, ctx.world_size)))
        start = torch.nn.utils.parameters_to_vector(self.params).detach()
        for rank, clients in jobs.items():
            send(self.message(plan, clients), self.payload(start, clients), rank)
        rows, reveals, reported = {}, [], {"loss_sum": 0.0, "samples": 0, "trained": 0}
        for rank in jobs:
            header, payload = receive(rank)
            for i, client in enumerate(header["clients"]):
                rows[client] = payload[i]
            reveals += list(payload[len(header["clients"]) :])
            for key in reported:
                reported[key] += header[key]
        comm_s, combining = time.perf_counter() - began, time.perf_counter()
        width = self.size + 1
        total = combine({c: r[:width] for c, r in rows.items()}, reveals, cfg.secure_aggregation, self.size)
        update = server_update(cfg, total, round_, self.size)
        self.apply(update, {c: r[width:] for c, r in rows.items()})
        self.report(ctx, plan, rows, update, reported, began, comm_s, time.perf_counter() - combining)

    def message(self, plan: RoundPlan, clients: list[int]) -> dict[str, Any]:
        """What a client rank is told: the setting, its jobs (client, steps, planned steps, why short, simulated
        seconds), the round's clients (masks are agreed among them) and who dropped (masks to reveal)."""
        setting = plan.setting
        jobs = [
            (c, plan.plans[c].steps, self._planned(c, setting), plan.plans[c].reason, plan.plans[c].sim_s)
            for c in clients
        ]
        return {
            "kind": "round",
            "setting": asdict(setting),
            "jobs": jobs,
            "peers": plan.sampled,
            "dropped": plan.dropped(),
        }

    def _planned(self, client: int, setting: Setting) -> int:
        return local_steps(self.sizes[client], setting.local_epochs, setting.local_batch)

    def payload(self, start: torch.Tensor, clients: list[int]) -> torch.Tensor:
        """The global weights; SCAFFOLD adds c and each job's c_i."""
        if not self.scaffold:
            return start.unsqueeze(0)
        own = [self.client_controls.get(c, torch.zeros(self.size)) for c in clients]
        return torch.stack([start, self.control, *own])

    def apply(self, update: torch.Tensor, control_deltas: dict[int, torch.Tensor]) -> None:
        """One server optimizer step on the pseudo-gradient ``-update``; SCAFFOLD moves c and the c_i."""
        offset = 0
        for p in self.params:
            p.grad = -update[offset : offset + p.numel()].view_as(p).to(p.dtype)
            offset += p.numel()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaffold:
            for client in sorted(control_deltas):
                delta = control_deltas[client].float()
                self.client_controls[client] = self.client_controls.get(client, torch.zeros(self.size)) + delta
                self.control += delta / self.cfg.clients

    def report(
        self,
        ctx: RankContext,
        plan: RoundPlan,
        rows: dict[int, torch.Tensor],
        update: torch.Tensor,
        reported: dict[str, Any],
        began: float,
        comm_s: float,
        compute_s: float,
    ) -> None:
        """The round's ``round`` and ``step`` events."""
        cfg, round_ = self.cfg, plan.setting.round
        sim_s = plan.sim_s(cfg.deadline_s)
        self.sim_total_s += sim_s
        self.samples += reported["trained"]
        event = events.Round(
            type="round", round=round_, sampled=len(plan.sampled), completed=len(rows),
            partial=sum(plan.plans[c].reason == "partial" for c in rows), dropped=len(plan.dropped()),
            samples=reported["samples"], update_norm=float(update.norm()),
            bytes_down=plan.bytes_down * len(plan.sampled), bytes_up=plan.bytes_up * len(rows),
            sim_s=sim_s, sim_total_s=self.sim_total_s, wall_s=time.perf_counter() - began,
            fraction=cfg.fraction, local_epochs=cfg.local_epochs, mu=cfg.mu,
        )  # fmt: skip
        loss = reported["loss_sum"] / reported["samples"] if reported["samples"] else None
        if loss is not None:
            event["loss"] = loss
        if self.changed:
            event["knobs"], self.changed = dict(self.changed), {}
        if self.accountant is not None:
            self.accountant.step(cfg.dp_noise_multiplier, cfg.fraction)
            event["epsilon"] = self.accountant.epsilon(cfg.dp_delta)
        ctx.reporter.send(event)
        row = {"loss": loss} if loss is not None else {}
        ctx.reporter.step(
            round_, samples=reported["trained"], lr=ctx.lr, step_time=event["wall_s"],
            compute_s=compute_s, comm_s=comm_s, wait_s=0.0, **row,
        )  # fmt: skip

    # ---- checkpoints ---------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "control": self.control,
            "client_controls": self.client_controls,
            "privacy": self.accountant.history if self.accountant else [],
            "sim_total_s": self.sim_total_s,
            "samples": self.samples,
        }

    def load(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.control, self.client_controls = state["control"], dict(state["client_controls"])
        if self.accountant is not None:
            self.accountant = privacy.Accountant(state["privacy"])
        self.sim_total_s, self.samples = float(state["sim_total_s"]), int(state["samples"])
