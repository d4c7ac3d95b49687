"""The events ranks send and the kernel records: one TypedDict per type.

Every sender builds its events from these classes, and ``docs/events.md``
lists exactly these types and fields (a test compares the two). Every event
has ``type``; the reporter adds ``rank`` and ``time`` (Unix seconds) when it
sends, and the kernel adds ``attempt`` when it records.

>>> Checkpoint(type="checkpoint", step=40, path="runs/x/checkpoints/step-000040")["step"]
40
>>> sorted(TYPES)[:3]
['balance', 'beat', 'checkpoint']
"""

# No `from __future__ import annotations`: TypedDict reads NotRequired from evaluated annotations.

from typing import Any

from typing_extensions import NotRequired, TypedDict


class Event(TypedDict):
    """What every event has."""

    type: str
    rank: NotRequired[int]
    time: NotRequired[float]
    attempt: NotRequired[int]


class Step(Event):
    """A training step of one rank (also whatever a function gives ``ddlkit.log``)."""

    step: int
    loss: NotRequired[Any]
    samples: NotRequired[int]
    lr: NotRequired[float]
    step_time: NotRequired[float]
    compute_s: NotRequired[float]
    comm_s: NotRequired[float]
    wait_s: NotRequired[float]
    network_s: NotRequired[float]
    comm_bytes: NotRequired[int]
    idle_s: NotRequired[float]
    transfer_s: NotRequired[float]
    staleness: NotRequired[int]
    version: NotRequired[int]
    dropped: NotRequired[bool]


class Balance(Event):
    step: int
    share: int
    shares: list[int]
    speeds: list[float]


class Cuts(Event):
    layer_s: list[float]
    cuts: list[int]
    param_cuts: list[int]
    stage_s: list[float]
    param_stage_s: list[float]


class Span(Event):
    step: NotRequired[int]  # added by the rank loop
    stage: int
    micro_batch: int
    phase: str  # "forward", "backward" (whole), or split: "input" (input gradient) and "weight" (weight gradient)
    start: float
    end: float


class Update(Event):
    worker: int
    step: int
    read_version: int
    applied_version: int
    staleness: int
    dropped: bool
    idle_s: NotRequired[float]


class Memory(Event):
    step: int
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    peak_activation_bytes: int
    cuda_peak_bytes: NotRequired[int]  # on a GPU: the caching allocator's high-water mark during the step
    cuda_reserved_bytes: NotRequired[int]  # on a GPU: the most bytes the allocator held from the driver then


class Comm(Event):
    step: int
    comm_bytes: int
    comm_calls: int
    wire_bytes: NotRequired[int]  # what the algorithms move per rank (ring all-reduce: 2(n-1)/n of the payload)
    network_s: NotRequired[float]  # the emulated network's modelled seconds in that step


class ControlRequest(Event):
    lr: NotRequired[float]
    paused: NotRequired[bool]
    stop: NotRequired[bool]
    save: NotRequired[bool]
    slowdown: NotRequired[dict[str, float]]
    network: NotRequired[Any]  # a preset name or {"latency_ms": ..., "bandwidth_gbps": ...}
    knobs: NotRequired[dict[str, Any]]  # a strategy's live knobs, by name


class Control(ControlRequest):
    step: int


class Checkpoint(Event):
    step: int
    path: str


class Restart(Event):
    reason: str
    from_step: int
    checkpoint: str | None
    skipped: list[str]


class Layout(Event):
    strategy: str
    world_size: int
    batch_size: int
    from_step: int
    checkpoint: str | None
    skipped: list[str]


class Error(Event):
    traceback: str
    restarting: NotRequired[bool]


class Finished(Event):
    steps: NotRequired[int]
    samples: NotRequired[int]
    train_s: NotRequired[float]
    stopped: NotRequired[bool]
    updates: NotRequired[int]
    param_checksum: NotRequired[float]
    payload_bytes: NotRequired[int]
    wire_bytes: NotRequired[int]
    network_s: NotRequired[float]


class Beat(Event):
    step: int
    started: NotRequired[bool]  # past start-up: in the rank loop (the hang timeout applies from here)
    waiting: NotRequired[bool]  # its main thread is in communication (waiting for peers), not in its own code


class Eval(Event):
    step: int  # steps (rounds) done when measured
    loss: float
    accuracy: NotRequired[float]  # not for regression
    samples: int


class Round(Event):
    round: int
    sampled: int
    completed: int  # whole or partial work aggregated
    partial: int  # of those, partial work (FedProx under a deadline)
    dropped: int
    samples: int  # training samples of the completed clients
    loss: NotRequired[float]  # their mean local training loss, weighted by samples
    update_norm: float  # of the aggregated update
    bytes_down: int
    bytes_up: int
    sim_s: float
    sim_total_s: float
    wall_s: float
    fraction: float
    local_epochs: int
    mu: float
    knobs: NotRequired[dict[str, Any]]  # live knobs applied at this round's start
    epsilon: NotRequired[float]


class Client(Event):
    client: int
    round: int
    samples: int
    local_steps: int
    update_norm: float
    loss: NotRequired[float]
    dropped: bool
    partial: bool
    reason: str
    sim_s: float


class Partition(Event):
    partition: str
    labels: list[int]
    counts: list[list[int]]  # clients x labels


TYPES: dict[str, type] = {
    "step": Step,
    "span": Span,
    "balance": Balance,
    "cuts": Cuts,
    "update": Update,
    "memory": Memory,
    "comm": Comm,
    "control_request": ControlRequest,
    "control": Control,
    "checkpoint": Checkpoint,
    "restart": Restart,
    "layout": Layout,
    "error": Error,
    "finished": Finished,
    "beat": Beat,
    "eval": Eval,
    "round": Round,
    "client": Client,
    "partition": Partition,
}
COMMON_FIELDS = ("type", "rank", "time", "attempt")


def fields(kind: str) -> list[str]:
    """The fields of an event type besides those every event has.

    >>> fields("checkpoint")
    ['step', 'path']
    """
    return [name for name in TYPES[kind].__annotations__ if name not in COMMON_FIELDS]
