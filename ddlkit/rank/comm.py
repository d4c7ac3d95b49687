"""Count the bytes a rank hands to communication during one step.

Every collective and point-to-point call of ``torch.distributed`` (DDP's
bucket all-reduces, FSDP2's all-gathers and reduce-scatters, DTensor's
redistributions, the pipeline's sends) goes through the dispatcher as a
``c10d`` (or ``_c10d_functional``) op, so a ``TorchDispatchMode`` sees each
one with its tensors. Counted: the bytes of the tensors this rank contributes
(the input of a collective, the tensor of a send; a receive counts nothing, its
bytes were counted by the sender; a broadcast counts its tensor on every
rank). That is the payload; how many bytes cross the wire depends on the
algorithm (a ring all-reduce moves about 2x the payload per rank).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .. import events

# c10d ops whose first argument is the output and second the input
_OUTPUT_FIRST = ("allgather", "reduce_scatter", "_allgather_base", "_reduce_scatter_base", "alltoall")


class CommCounter(TorchDispatchMode):
    """Payload bytes and calls of the communication ops run inside it.

    >>> with CommCounter() as comm:
    ...     _ = torch.ones(2) + 1  # no communication
    >>> comm.event(step=1)
    {'type': 'comm', 'step': 1, 'comm_bytes': 0, 'comm_calls': 0}
    """

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        namespace, name = func.namespace, func.__name__
        if namespace in ("c10d", "_c10d_functional") and not name.startswith(("recv", "wait", "barrier")):
            sent = args[1] if namespace == "c10d" and name.startswith(_OUTPUT_FIRST) else args[0]
            self.bytes += nbytes(sent)
            self.calls += 1
        return func(*args, **(kwargs or {}))

    def event(self, step: int) -> events.Comm:
        """What was counted, as the ``comm`` event of ``step``."""
        return events.Comm(type="comm", step=step, comm_bytes=self.bytes, comm_calls=self.calls)


def nbytes(value: Any) -> int:
    """Bytes of a tensor, or of the tensors in a (nested) list."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(nbytes(v) for v in value)
    return 0
