"""Every accelerate entry point sees the rank's group, on CPU as on GPUs.

accelerate 1.15 decides ``DistributedType.MULTI_CPU`` in
``PartialState._prepare_backend`` only when its ``cpu`` argument is true.
``AcceleratorState`` (so ``Accelerator()``) turns ``ACCELERATE_USE_CPU=1``,
which ddlkit gives every CPU rank, into ``cpu=True``; a plain
``PartialState()`` does not read that flag. With ``LOCAL_RANK`` set and no GPU
none of its device branches match, and it settles on ``DistributedType.NO``
with one process on every rank, so ``gather``/``reduce`` silently act locally.
Its state is a singleton shared by all three: whichever is made first decides
for the others (``PartialState()`` then ``Accelerator()`` is ``NO`` too).
Ranks under torchrun get the same (as reported in issue 16; not re-checked here).

In a rank ddlkit starts on CPU, :func:`see_the_group` makes ``PartialState``'s
``cpu`` follow ``ACCELERATE_USE_CPU`` as ``AcceleratorState`` already does,
so any of the three made first joins one N-rank gloo group (from the
``RANK``/``WORLD_SIZE``/``MASTER_*`` environment the rank was started with).
A forked rank also drops any accelerate state the kernel had made for itself
(a notebook that ran ``Accelerator()`` before launching): that one-process
state is not the rank's.
"""

from __future__ import annotations

import functools
import sys
from typing import Any


def see_the_group() -> None:
    """Prepare accelerate in this rank: no state inherited from the kernel, and
    a plain ``PartialState()`` on CPU joins the group. Idempotent. The rank's
    entry calls it before a user's function (it changes accelerate in this
    process, so it is no doctest)::

        see_the_group()
        PartialState().distributed_type   # DistributedType.MULTI_CPU, num_processes == WORLD_SIZE
    """
    if "accelerate.state" in sys.modules:  # imported by the kernel this rank was forked from
        forget_the_kernels_state()
    from accelerate.utils import parse_flag_from_env

    if parse_flag_from_env("ACCELERATE_USE_CPU"):
        cpu_by_default()


def forget_the_kernels_state() -> None:
    """Empty accelerate's shared states, as a fresh interpreter has them."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    if PartialState._shared_state or AcceleratorState._shared_state or GradientState._shared_state:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def cpu_by_default() -> None:
    """``PartialState``'s ``cpu`` is true whatever the caller passes, as
    ``AcceleratorState`` makes it under ``ACCELERATE_USE_CPU``: the rank runs on CPU."""
    from accelerate.state import PartialState

    original = PartialState.__init__
    if getattr(original, "ddlkit_cpu", False):
        return

    @functools.wraps(original)
    def on_cpu(self: PartialState, cpu: bool = True, **kwargs: Any) -> None:
        original(self, True, **kwargs)

    on_cpu.ddlkit_cpu = True  # type: ignore[attr-defined]
    PartialState.__init__ = on_cpu  # type: ignore[method-assign]
