"""Federated learning: many virtual clients keep their data; a server combines
their model updates and never sees a sample.

Rank 0 is the server; ranks 1.. are a simulation engine that trains the
clients the server hands them (``clients=100`` on ``world_size=3``: two ranks
train 100 clients). A round (``ctx.tick(round)``: live knobs, faults, stop):

1. the server samples the round's clients (``fraction`` of them; with
   differential privacy, each with probability ``fraction``) and plans each
   one on its simulated device (``ddlkit.devices``): a ``dropout`` vanishes, a
   client that would miss ``deadline_s`` is dropped, or under FedProx sends
   the steps it managed (partial work);
2. it hands the clients to the client ranks, balanced by work, with the global
   weights and the round's setting: learning rate and the live knobs
   (``local_epochs``, ``mu``, ``fraction``), which so take effect at a round
   boundary (the ``round`` event says which changed);
3. each client rank trains its clients (``strategies/clients.py``) and sends
   back one row per client, ``[weight * update, weight]`` (weight: its samples;
   with DP the update clipped to ``dp_clip`` and weight 1), as masked
   fixed-point integers with ``secure_aggregation`` (``ddlkit.secagg``), and a
   ``client`` event per client (to the experimenter, not to the server);
4. the server sums the rows in client order, divides (``fedplan.server_update``),
   and steps its optimizer (``server_optimizer``) on the pseudo-gradient
   ``-update``; then a ``round`` event, a ``step`` event (the clients' mean
   training loss), an ``eval`` event when due and a checkpoint when due.

A client rank that dies ends the attempt (gloo cannot go on without a peer);
with ``max_restarts`` and ``checkpoint_every`` the run goes on from the last
round checkpointed, and redoes the same rounds: every draw is seeded by round.
"""

from __future__ import annotations

import secrets
from typing import Any

import torch
import torch.distributed as dist

from .. import events, partition, privacy, secagg
from ..config import RunConfig
from ..devices import profile
from ..rank.strategy import OptimizerFactory, RankContext, Strategy
from ..registry import StrategySpec, register
from .clients import LocalTrainer, Setting
from .fedknobs import KNOBS, layout
from .fedserver import Server
from .fedwire import DONE, receive, send


class Federated(Strategy):
    def __init__(
        self, cfg: RunConfig, accelerator: Any, model: torch.nn.Module, task: str, make_optimizer: OptimizerFactory
    ):
        self.cfg, self.model, self.task, self.make_optimizer = cfg, model, task, make_optimizer
        self.rank, self.world_size = accelerator.process_index, accelerator.num_processes
        self.dp_rank, self.dp_size = 0, 1  # no shared data stream: each client reads its own part
        self.optimizer = None  # the server's lives in its Server; clients make theirs per round
        self.server: Server | None = None
        self.secret = b""  # secure aggregation: known to the client ranks only

    def setup(self, ctx: RankContext) -> None:
        """Every rank splits the training data among the clients (a pure function of the seed)."""
        cfg = self.cfg
        labels = partition.labels_of(ctx.dataset)
        self.parts = partition.split(labels, cfg.clients, cfg.partition, cfg.alpha, cfg.shards_per_client, cfg.seed)
        self.size = sum(p.numel() for p in self.model.parameters())
        if self.rank == 0:
            devices = profile(cfg.devices, cfg.clients, cfg.seed)
            self.server = Server(cfg, self.model, [len(p) for p in self.parts], devices, ctx)
            table = partition.label_table(labels, self.parts, ctx.dataset.num_outputs if self.task == "classify" else 1)
            ctx.reporter.send(
                events.Partition(
                    type="partition",
                    partition=cfg.partition,
                    labels=list(range(table.shape[1])),
                    counts=table.tolist(),
                )
            )
        else:
            self.trainer = LocalTrainer(self.model, ctx.dataset, self.parts, self.task, self.make_optimizer, cfg.seed)
            if cfg.secure_aggregation:
                self.secret = self.agree_on_secret()

    def agree_on_secret(self) -> bytes:
        """The client ranks' shared secret for the pairwise masks; rank 0 never receives it."""
        box = torch.frombuffer(bytearray(secrets.token_bytes(32)), dtype=torch.uint8)
        if self.rank == 1:
            for peer in range(2, self.world_size):
                dist.send(box, dst=peer)
        else:
            dist.recv(box, src=1)
        return bytes(box.tolist())

    def serves(self) -> bool:
        return True  # the server serves rounds; the client ranks serve the server's requests

    def serve(self, ctx: RankContext) -> dict[str, Any]:
        if self.server is not None:
            return self.server.run(self, ctx, self.stop_clients)
        while True:
            header, payload = receive(src=0)
            if header["kind"] == DONE:
                return {}
            ctx.tick(header["setting"]["round"], self)  # progress; a fault aimed at this rank fires mid-round
            rows, message = self.train_clients(ctx, header, payload)
            send(message, rows, dst=0)

    def train_clients(
        self, ctx: RankContext, header: dict[str, Any], payload: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """This rank's clients of the round: train, report, and the rows for the server."""
        cfg, setting = self.cfg, Setting(**header["setting"])
        start, rows, reveals, done = payload[0], [], [], []
        totals = {"loss_sum": 0.0, "samples": 0, "trained": 0}
        for index, (client, steps, planned, reason, sim_s) in enumerate(header["jobs"]):
            event = events.Client(
                type="client", client=client, round=setting.round, samples=len(self.parts[client]),
                local_steps=steps, update_norm=0.0, dropped=steps == 0, partial=0 < steps < planned,
                reason=reason, sim_s=sim_s,
            )  # fmt: skip
            if steps == 0:
                ctx.reporter.send(event)
                continue
            controls = (payload[1], payload[2 + index]) if setting.scaffold else None
            outcome = self.trainer.train(client, steps, start, setting, controls)
            event["update_norm"], event["loss"] = float(outcome.update.norm()), outcome.loss
            ctx.reporter.send(event)
            row = self.row(client, outcome.update, setting, header)
            if outcome.control_delta is not None:
                row = torch.cat([row, outcome.control_delta.double()])
            if cfg.secure_aggregation:
                reveals.append(self.reveal(client, header))
            rows.append(row)
            done.append(client)
            size = len(self.parts[client])
            totals["loss_sum"] += outcome.loss * size
            totals["samples"] += size
            totals["trained"] += steps * (setting.local_batch or size)
        empty = torch.empty(0, self.size + 1, dtype=torch.int64 if cfg.secure_aggregation else torch.float64)
        stacked = torch.stack(rows + reveals) if rows else empty
        return stacked, {"kind": "round", "clients": done, **totals}

    def row(self, client: int, update: torch.Tensor, setting: Setting, header: dict[str, Any]) -> torch.Tensor:
        """``[weight * update, weight]``: weight = samples, or with DP the update clipped and weight 1;
        with secure aggregation masked fixed-point integers (int64 bits)."""
        cfg = self.cfg
        if cfg.dp_noise_multiplier > 0:
            update, weight = privacy.clip(update, cfg.dp_clip), 1.0
        else:
            weight = float(len(self.parts[client]))
        values = torch.cat([update.double() * weight, torch.tensor([weight], dtype=torch.float64)])
        if not cfg.secure_aggregation:
            return values
        masked = secagg.masked(values, client, header["peers"], self.secret, setting.round)
        return torch.from_numpy(masked.view("int64"))

    def reveal(self, client: int, header: dict[str, Any]) -> torch.Tensor:
        shares = secagg.reveal(client, header["dropped"], self.secret, header["setting"]["round"], self.size + 1)
        return torch.from_numpy(shares.view("int64"))

    def stop_clients(self) -> None:
        for rank in range(1, self.world_size):
            send({"kind": DONE}, torch.empty(0), dst=rank)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The global model (the server's); client ranks hold no state of their own."""
        if self.rank != 0:
            return {}
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}

    def checkpoint_state(self) -> dict[str, Any]:
        assert self.server is not None
        return self.server.state()

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        assert self.server is not None
        self.server.load(state)

    def on_knobs(self, changed: dict[str, Any]) -> None:
        if self.server is not None:  # the next round carries them; its event says so
            self.server.changed.update(changed)

    def set_lr(self, lr: float) -> None:
        return None  # the server sends the learning rate in force with every round


register(
    StrategySpec(
        "federated",
        Federated,
        "federated learning: rank 0 serves, the other ranks train many virtual clients (FedAvg, FedProx, SCAFFOLD)",
        knobs=KNOBS,
        layout=layout,
        dp_size=lambda cfg: 1,
        checkpoint="consolidated",
        lockstep=False,
        cpu_only=True,
        position=4,
        length=lambda cfg: cfg.rounds,
    )
)
