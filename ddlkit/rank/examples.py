"""An ordinary accelerate training function, as a user would write one.

It runs under ``ddlkit.launch(train_digits, ...)``, under
``ddlkit.launch("ddlkit.rank.examples:train_digits", ...)`` (spawned, for a kernel
that already initialised CUDA), and with no launcher at all. With
``log_every=0`` it reports nothing while training: the bare accelerate loop
that ``benchmarks/overhead.py`` measures ddlkit against.
"""

from __future__ import annotations

import time

import torch

from ..data import ShardedStream, load_dataset
from ..models import build_model, loss_fn
from .reporter import log


def train_digits(
    steps: int = 100, batch_size: int = 32, lr: float = 0.05, seed: int = 0, log_every: int = 1, hidden: int = 128
) -> dict[str, float]:
    """Data-parallel SGD of the built-in MLP on digits; returns timing.

    Example: one process, no launcher (``ddlkit.launch(train_digits, num_processes=2)`` for two)::

        train_digits(steps=3, log_every=0)["steps"]   # 3
    """
    from accelerate import Accelerator

    accelerator = Accelerator()
    torch.manual_seed(seed)
    dataset = load_dataset("digits")
    model = build_model("mlp", dataset, hidden)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    model, optimizer = accelerator.prepare(model, optimizer)
    shard = ShardedStream(len(dataset), batch_size, accelerator.process_index, accelerator.num_processes, seed)

    started = time.perf_counter()
    for step in range(steps):
        index = shard.indices(step)
        inputs = dataset.inputs[index].to(accelerator.device)
        targets = dataset.targets[index].to(accelerator.device)
        loss = loss_fn(dataset.task, model(inputs), targets)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if log_every and step % log_every == 0:
            log(step=step, loss=loss.item(), samples=len(index))
    elapsed = time.perf_counter() - started
    return {"steps": steps, "train_s": elapsed, "step_time": elapsed / steps}
