"""Memory per rank, measured during one training step, for any strategy.

The rank loop wraps one step (``MEMORY_STEP``, after warm-up, so optimizer state
exists) in a :class:`MemoryMeter` and sends what it measured as a ``memory``
event. All numbers are this rank's own bytes (a DTensor counts its local shard):

- ``param_bytes``: the parameters the rank's optimizer updates;
- ``grad_bytes``: their gradients, read just before the optimizer step;
- ``optimizer_bytes``: the optimizer's state tensors after the step
  (0 for plain SGD, two parameter-sized buffers for Adam);
- ``peak_activation_bytes``: the most bytes that autograd held saved for
  backward at any moment of the step. On CPU there is no allocator high-water
  mark to read, so it is counted with ``torch.autograd.graph.saved_tensors_hooks``:
  each tensor saved for backward adds its storage's bytes (a storage saved
  twice counts once) until autograd frees it after its backward. This leaves out
  short-lived temporaries (never saved), so it is the memory activations keep
  alive between forward and backward, which is what pipeline schedules and
  micro-batching change. Parameters saved for backward (also as views, such as
  ``weight.t()``) are not activations and are not counted.

On a GPU the event also has the CUDA caching allocator's own figures for the
step (``torch.cuda.max_memory_allocated`` after a reset at its start, and
``max_memory_reserved``): ``cuda_peak_bytes`` counts everything on the device
at its high-water mark (weights, gradients, optimizer state, activations,
temporaries and communication buffers), so it is at least the sum above.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.tensor import DTensor

from .. import events

MEMORY_STEP = 1  # measured on the second step (the first after warm-up), or the last if fewer


class MemoryMeter:
    """Measure one step's memory; use as a context manager around it.

    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    >>> optimizer = torch.optim.Adam(model.parameters())
    >>> with MemoryMeter(optimizer) as meter:
    ...     model(torch.ones(16, 4)).sum().backward()
    ...     optimizer.step()
    >>> meter.event(step=1)["param_bytes"], meter.event(step=1)["optimizer_bytes"] > 0
    (196, True)
    """

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer
        self.grad_bytes = 0
        self.peak_activation_bytes = 0
        self._live_bytes = 0
        self._saved: dict[int, list[int]] = {}  # storage address -> [bytes, times saved and not yet freed]
        self.cuda: torch.device | None = None  # the GPU the parameters are on, if any
        self.cuda_bytes: dict[str, int] = {}

    def __enter__(self) -> MemoryMeter:
        params = self._params()
        self._param_storages = {local(p).untyped_storage().data_ptr() for p in params}
        self.cuda = local(params[0]).device if params and local(params[0]).is_cuda else None
        if self.cuda is not None:
            torch.cuda.synchronize(self.cuda)
            torch.cuda.reset_peak_memory_stats(self.cuda)
        self._grad_hook = self.optimizer.register_step_pre_hook(self._count_grads)
        self._saved_hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)
        self._saved_hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._saved_hooks.__exit__(*exc)
        self._grad_hook.remove()
        if self.cuda is not None:
            torch.cuda.synchronize(self.cuda)
            self.cuda_bytes = {
                "cuda_peak_bytes": torch.cuda.max_memory_allocated(self.cuda),
                "cuda_reserved_bytes": torch.cuda.max_memory_reserved(self.cuda),
            }

    def event(self, step: int) -> events.Memory:
        """What was measured, as the ``memory`` event of ``step``."""
        measured = events.Memory(
            type="memory",
            step=step,
            param_bytes=_bytes(self._params()),
            grad_bytes=self.grad_bytes,
            optimizer_bytes=_bytes(
                t for state in self.optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor)
            ),
            peak_activation_bytes=self.peak_activation_bytes,
        )
        if self.cuda is not None:
            measured["cuda_peak_bytes"] = self.cuda_bytes["cuda_peak_bytes"]
            measured["cuda_reserved_bytes"] = self.cuda_bytes["cuda_reserved_bytes"]
        return measured

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def _count_grads(self, *_: Any) -> None:
        self.grad_bytes = max(self.grad_bytes, _bytes(p.grad for p in self._params() if p.grad is not None))

    def _pack(self, tensor: torch.Tensor) -> Any:
        # A weight is often saved as a view (``weight.t()`` for a matmul): a
        # parameter, not an activation.
        if isinstance(tensor, torch.nn.Parameter) or isinstance(tensor._base, torch.nn.Parameter):
            return tensor
        storage = local(tensor).untyped_storage()
        if storage.data_ptr() in self._param_storages:
            return tensor
        entry = self._saved.setdefault(storage.data_ptr(), [storage.nbytes(), 0])
        if entry[1] == 0:
            self._live_bytes += entry[0]
            self.peak_activation_bytes = max(self.peak_activation_bytes, self._live_bytes)
        entry[1] += 1
        return _Saved(tensor, self, storage.data_ptr())

    def _release(self, address: int) -> None:
        entry = self._saved[address]
        entry[1] -= 1
        if entry[1] == 0:
            self._live_bytes -= entry[0]
            del self._saved[address]


class _Saved:
    """A tensor autograd saved for backward; when autograd drops it, its bytes stop counting."""

    def __init__(self, tensor: torch.Tensor, meter: MemoryMeter, address: int):
        self.tensor, self.meter, self.address = tensor, meter, address

    def __del__(self) -> None:
        self.meter._release(self.address)


def _unpack(saved: Any) -> torch.Tensor:
    return saved.tensor if isinstance(saved, _Saved) else saved


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor (a DTensor's local shard, else the tensor)."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _bytes(tensors: Any) -> int:
    return sum(local(t).numel() * local(t).element_size() for t in tensors)
