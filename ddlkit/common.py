"""The fields every experiment has, each described once, as a strategy's knobs are.

A :class:`~ddlkit.knobs.Knob` says a field's default, which values are valid (a
check, and the same in words for the error message), the widget that sets it
in the ControlPanel and its help in ``ddlkit run --help``. ``RunConfig`` takes
its defaults from here and checks every value it is given against them as it
is set; ``validate()`` adds the rules that relate several fields.

>>> COMMON["steps"].problem(0)
'steps=0 is invalid: it must be a positive integer'
>>> COMMON["model"].problem("mpl")
"model='mpl' is invalid: valid values are ['mlp', 'cnn', 'lm'] (did you mean 'mlp'?)"
>>> COMMON["strategy"].problem("pipline").endswith("(did you mean 'pipeline'?)")
True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import devices, registry
from .knobs import (
    Knob,
    Widget,
    choice,
    choice_problem,
    flag,
    integer,
    is_int,
    is_number,
    non_negative_number,
    optional,
    positive_number,
    within,
)
from .network import VALID as NETWORK_VALID
from .network import problem as network_problem

MODELS = ("mlp", "cnn", "lm")
DATASETS = ("digits", "synthetic", "regression", "sonnets")
OPTIMIZERS = ("sgd", "adam", "adamw")
DEVICES = ("auto", "cpu", "cuda")
FAULT_KEYS = {"rank", "step", "kind", "attempt"}
MAX_WIDTH = 4096  # hidden and seq_len: the built-in models are small; a typo must not eat the memory


@dataclass(frozen=True)
class StrategyKnob(Knob):
    """The strategy field: its options are whatever the registry holds when asked."""

    def problem(self, value: Any) -> str | None:
        return choice_problem(self.name, value, registry.names())


class NetworkKnob(Knob):
    """``network``: the message says what is wrong with a preset name or a dict (``ddlkit.network``)."""

    def problem(self, value: Any) -> str | None:
        return network_problem(value)


@dataclass(frozen=True)
class ProfileKnob(Knob):
    """rank_profile: None, or a device profile (the nearest one named for a typo)."""

    def problem(self, value: Any) -> str | None:
        return None if value is None else choice_problem(self.name, value, devices.KINDS)


def one_fault(value: Any) -> bool:
    return isinstance(value, dict) and {"rank", "step", "kind"} <= set(value) <= FAULT_KEYS


def faults(value: Any) -> bool:
    """None, one fault dict, or a list of them (ranks and steps are checked against the run by validate())."""
    return value is None or one_fault(value) or (isinstance(value, list) and all(one_fault(f) for f in value))


def rank_map(smallest: float) -> Any:
    """None, or a dict {rank: number >= smallest} (the ranks are checked against world_size by validate())."""
    return optional(
        lambda value: (
            isinstance(value, dict)
            and all(is_int(r) and r >= 0 and is_number(v) and v >= smallest for r, v in value.items())
        )
    )


def text(value: Any) -> bool:
    return isinstance(value, str) and value != ""


def _knob(name: str, default: Any, check: Any, valid: str, help: str, widget: Widget | None = None) -> Knob:
    return Knob(name, default, check, valid, widget, help)


COMMON: dict[str, Knob] = {
    knob.name: knob
    for knob in (
        StrategyKnob(
            "strategy",
            "data",
            lambda value: value in registry.names(),
            "a registered strategy",
            Widget("choice", "strategy"),  # its options: the registry's, when the panel is drawn
            "how the work is split over the ranks (the strategies are listed below)",
        ),
        integer("world_size", 2, 1, "world size", "processes (ranks) to start", up_to=1024),
        choice("model", "mlp", MODELS, "model", "mlp and cnn learn digits; lm is a tiny character transformer"),
        choice("dataset", "digits", DATASETS, "dataset", "digits (scikit-learn's), synthetic, regression, sonnets"),
        integer("steps", 200, 1, "steps", "optimizer steps to take"),
        integer(
            "batch_size",
            32,
            1,
            "batch / replica",
            "samples per data-parallel replica and step; the global batch is this times the replicas",
        ),
        _knob(
            "lr",
            0.05,
            positive_number,
            "a positive number",
            "learning rate (live: run.set_lr)",
            Widget("float", "lr", 1e-4, 1.0),
        ),
        choice("optimizer", "sgd", OPTIMIZERS, "optimizer", "sgd (plain), adam or adamw"),
        _knob(
            "seed",
            0,
            within(0, 2**63 - 1),
            "an integer 0..2**63-1",
            "seeds the initial weights and the order of the data",
        ),
        choice("device", "auto", DEVICES, "device", "auto: cuda when a GPU is visible, else cpu"),
        integer("log_every", 1, 1, None, "send a step row every this many steps"),
        integer(
            "time_every",
            20,
            1,
            None,
            "lockstep strategies: time the wait for the slowest peer (idle) apart from moving bytes (transfer) "
            "every this many steps",
        ),
        _knob(
            "run_dir",
            "runs",
            text,
            "a folder (a non-empty str or pathlib.Path)",
            "where runs/<id>/ folders are written",
        ),
        _knob(
            "hang_timeout",
            120.0,
            lambda value: is_number(value) and value >= 1,
            "a number of seconds >= 1 (ranks beat once a second)",
            "seconds without a step before a rank is hung",
        ),
        _knob(
            "fault",
            None,
            faults,
            "None, a dict like {'rank': 1, 'step': 5, 'kind': 'exception'} (optionally with 'attempt': 0), "
            "or a list of them",
            "teaching: make a rank fail at a step; kind: exception, exit, sigkill or hang",
        ),
        Knob(
            "checkpoint_every",
            None,
            optional(lambda value: is_int(value) and value >= 1),
            "None or a positive integer",
            Widget("int", "checkpoint every (0: off)", 0, 1_000_000, none_as=0),
            "save the training state every this many steps (restarts and resume start from it)",
        ),
        integer("keep_checkpoints", 2, 1, None, "how many of the newest checkpoints to keep"),
        integer("max_restarts", 0, 0, None, "restart every rank from the newest checkpoint this often when one fails"),
        _knob(
            "hidden", 128, within(1, MAX_WIDTH), f"an integer 1..{MAX_WIDTH}", "hidden width of the model (small ones)"
        ),
        _knob("seq_len", 32, within(1, MAX_WIDTH), f"an integer 1..{MAX_WIDTH}", "characters per sample (lm)"),
        integer(
            "threads", None, 1, None, "torch threads per rank (None: the cores divided by the ranks)", allow_none=True
        ),
        _knob(
            "slowdown",
            None,
            rank_map(1),
            "None or a dict {rank: factor >= 1}",
            "straggler: these ranks take this many times as long per step (live: run.control(slowdown=...))",
        ),
        _knob(
            "delay_s",
            None,
            rank_map(0),
            "None or a dict {rank: seconds >= 0}",
            "straggler: add these seconds to every step of these ranks",
        ),
        _knob(
            "delay_jitter_s",
            0.0,
            non_negative_number,
            "seconds >= 0",
            "add a random delay of this mean (seeded) to every rank's steps",
        ),
        _knob(
            "speeds",
            None,
            optional(lambda value: isinstance(value, dict) and all(is_number(v) and v > 0 for v in value.values())),
            "None or a dict {rank: speed > 0}",
            "heterogeneous ranks: relative compute speeds, e.g. {1: 0.5} runs rank 1 at half speed",
        ),
        ProfileKnob(
            "rank_profile",
            None,
            lambda value: value is None or value in devices.KINDS,
            f"None or one of {list(devices.KINDS)}",
            None,
            "heterogeneous ranks drawn from a device profile (edge: a slow quarter); speeds override it per rank",
        ),
        flag(
            "oversubscribe",
            False,
            None,
            "allow more CPU ranks than 4 per core (they then mostly wait for one; timings say little)",
        ),
        integer(
            "eval_every",
            None,
            1,
            None,
            "every this many steps (rounds), the loss and accuracy on a held-out share of the data no rank trains on",
            allow_none=True,
        ),
        NetworkKnob(
            "network",
            "loopback",
            lambda value: network_problem(value) is None,
            NETWORK_VALID,
            None,  # the ControlPanel draws its own menu (view.fields.network_menu)
            "the network between the ranks: every collective and message also takes the alpha-beta model's time "
            "(ddlkit.network; live: run.control(network=...))",
        ),
    )
}
