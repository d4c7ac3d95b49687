"""The federated strategy's knobs and layout rule (not a strategy: what
``federated.py`` registers). Every bad setting is one ValueError before
launch, naming the field, the value and what would be valid.

>>> from ddlkit.config import RunConfig
>>> RunConfig(strategy="federated", world_size=3, clients=100, fraction=0.1).validate()
>>> RunConfig(strategy="federated", world_size=3, fraction=1.5).validate()
Traceback (most recent call last):
...
ValueError: fraction=1.5 is invalid: it must be a number in (0, 1]
"""

from __future__ import annotations

from typing import Any

from .. import partition
from ..data import held_out_split, load_dataset
from ..devices import KINDS as DEVICE_KINDS
from ..knobs import Knob, Widget, choice, flag, integer, is_number, number, positive_number
from .fedplan import SERVER_OPTIMIZERS

ALGORITHMS = ("fedavg", "fedprox", "scaffold")


def _share(low_open: bool) -> Any:
    return lambda v: is_number(v) and (0 < v <= 1 if low_open else 0 <= v < 1)


KNOBS = (
    integer("clients", 10, 1, "clients", "virtual clients, each with its own data", up_to=100_000),
    Knob(
        "fraction", 0.1, _share(True), "a number in (0, 1]", Widget("float", "fraction C", 0.01, 1.0),
        "clients sampled per round (C); live: from the next round", live=True,
    ),
    integer("rounds", 20, 1, "rounds", "communication rounds"),
    integer("local_epochs", 1, 1, "local epochs E", "passes over its data a client makes per round", live=True),
    Knob(
        "local_batch", 10, lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 1),
        "a positive integer, or None (the client's whole data: with local_epochs=1 that is FedSGD)",
        Widget("int", "local batch B (0: all)", 0, 100_000, none_as=0), "a client's batch size",
    ),
    choice("algorithm", "fedavg", ALGORITHMS, "algorithm", "fedavg, fedprox (proximal term, partial work), scaffold"),
    number("mu", 0.0, 0.0, "mu (fedprox)", "FedProx's proximal weight; live: from the next round", live=True),
    choice("server_optimizer", "avg", SERVER_OPTIMIZERS, "server optimizer", "avg, fedavgm (momentum) or fedadam"),
    Knob(
        "server_lr", 1.0, positive_number, "a positive number", Widget("float", "server lr", 1e-4, 10.0),
        "the server optimizer's learning rate (fedavgm, fedadam; avg always takes the clients' mean)",
    ),
    choice("partition", "iid", partition.KINDS, "partition", "how the training data is split among the clients"),
    Knob(
        "alpha", 0.5, positive_number, "a number > 0 (small: skewed labels, large: close to IID)",
        Widget("float", "alpha (dirichlet)", 0.001, 1000.0), "Dirichlet concentration over labels",
    ),
    integer("shards_per_client", 2, 1, "shards per client", "label shards per client (partition='shards')"),
    choice("devices", "uniform", DEVICE_KINDS, "devices", "the clients' simulated compute and links"),
    Knob(
        "deadline_s", None, lambda v: v is None or (is_number(v) and v > 0), "None or a positive number of seconds",
        Widget("float", "deadline s (0: none)", 0.0, 1e5, none_as=0.0), "simulated seconds a round waits for clients",
    ),
    Knob(
        "dropout", 0.0, _share(False), "a probability in [0, 1)", Widget("float", "dropout", 0.0, 0.99),
        "chance that a sampled client vanishes in a round",
    ),
    flag("secure_aggregation", False, "secure aggregation", "pairwise masks: the server sees only the sum"),
    number("dp_noise_multiplier", 0.0, 0.0, "DP noise multiplier", "DP-FedAvg: noise std / clip (0: no DP)"),
    Knob(
        "dp_clip", 1.0, positive_number, "a positive number", Widget("float", "DP clip", 1e-4, 1e4),
        "DP-FedAvg: every client update is clipped to this L2 norm",
    ),
    Knob(
        "dp_delta", 1e-5, lambda v: is_number(v) and 0 < v < 1, "a number in (0, 1)", None,
        "the delta at which the privacy spent (epsilon) is reported",
    ),
)  # fmt: skip


def layout(cfg: Any) -> None:
    """The federated layout: a server and at least one client rank, enough
    clients, a split the data allows, settings that fit together."""
    if cfg.world_size < 2:
        raise ValueError(
            f"world_size={cfg.world_size} is invalid for strategy='federated': rank 0 is the server and at least "
            "one more rank trains the clients; valid: world_size >= 2"
        )
    if cfg.clients < cfg.world_size - 1:
        raise ValueError(
            f"clients={cfg.clients} is invalid with world_size={cfg.world_size}: every client rank needs a client; "
            f"valid: clients >= {cfg.world_size - 1}"
        )
    dataset = load_dataset(cfg.dataset, cfg.seed, cfg.seq_len)
    if cfg.partition != "iid" and dataset.task != "classify":
        raise ValueError(
            f"partition={cfg.partition!r} is invalid for dataset={cfg.dataset!r}: it splits by class label and "
            f"{cfg.dataset!r} has none; valid: partition='iid' (or a classification dataset: digits, synthetic)"
        )
    samples = len(held_out_split(dataset, cfg.seed)[0]) if cfg.eval_every is not None else len(dataset)
    labels = dataset.num_outputs if dataset.task == "classify" else 1
    partition.check(samples, cfg.clients, cfg.partition, cfg.alpha, cfg.shards_per_client, labels)
    _check_combinations(cfg)


def _check_combinations(cfg: Any) -> None:
    if cfg.mu > 0 and cfg.algorithm != "fedprox":
        raise ValueError(f"mu={cfg.mu} is invalid with algorithm={cfg.algorithm!r}: only fedprox reads it")
    if cfg.algorithm == "scaffold" and (cfg.secure_aggregation or cfg.dp_noise_multiplier > 0):
        raise ValueError(
            "algorithm='scaffold' is invalid with secure_aggregation or dp_noise_multiplier: its control variates "
            "travel in the clear; valid: algorithm='fedavg' or 'fedprox'"
        )
    if cfg.server_optimizer == "avg" and cfg.server_lr != 1.0:
        raise ValueError(f"server_lr={cfg.server_lr} is invalid with server_optimizer='avg' (the clients' mean)")
    late = [f["step"] for f in cfg.faults() if f["step"] >= cfg.rounds]
    if late:
        raise ValueError(
            f"fault step={late[0]} is invalid: a federated run's faults fire at rounds 0..{cfg.rounds - 1}"
        )
    if cfg.checkpoint_every is not None and cfg.checkpoint_every > cfg.rounds:
        raise ValueError(
            f"checkpoint_every={cfg.checkpoint_every} is invalid: it counts rounds, valid: 1..{cfg.rounds}"
        )
