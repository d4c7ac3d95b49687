"""An ordinary accelerate training function, as a user would write one.

``log_burst`` and ``logging_cost`` are what the event path is measured with:
a rank logging 10,000 events a second (``tests/test_log_burst.py`` counts
them; ``benchmarks/log_burst.py`` times the loop with and without them).

``train_digits`` runs under ``ddlkit.launch(train_digits, ...)``, under
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


def log_burst(rate: int = 10_000, seconds: float = 10.0) -> dict[str, float]:
    """Call ``log`` ``rate`` times a second for ``seconds``: exactly
    ``rate * seconds`` events, step 0, 1, ..., paced by the clock (never ahead
    of the schedule; behind it, as fast as the rank can).

    >>> log_burst(rate=1000, seconds=0.01)["events"]  # outside a run, log does nothing
    10
    """
    count = round(rate * seconds)
    started = time.perf_counter()
    for step in range(count):
        log(step=step, value=float(step))
        ahead = started + (step + 1) / rate - time.perf_counter()
        if ahead > 0.001:  # sleep only whole milliseconds: shorter sleeps overshoot
            time.sleep(ahead)
    return {"events": count, "seconds": time.perf_counter() - started}


def busy_work(units: int) -> int:
    """Some pure-Python work (about 0.04 us of CPU a unit here)."""
    return sum(i * i for i in range(units))


def logging_cost(blocks: int = 6, iterations: int = 10_000, units: int = 300) -> dict[str, list[float]]:
    """A loop of ``busy_work(units)`` per iteration, timed per block of
    ``iterations``, alternating blocks without and with one ``log`` per
    iteration, so drift in the machine affects both alike. Per iteration, in
    seconds: ``quiet``/``logging`` on the wall clock, ``quiet_cpu``/``logging_cpu``
    in CPU time of the whole process (the reporter's thread included: on a
    loaded machine it is the steadier measure).

    >>> sorted(logging_cost(blocks=1, iterations=10, units=1))
    ['logging', 'logging_cpu', 'quiet', 'quiet_cpu']
    """
    times: dict[str, list[float]] = {"quiet": [], "logging": [], "quiet_cpu": [], "logging_cpu": []}
    step = 0
    for _ in range(blocks):
        for kind in ("quiet", "logging"):
            started, cpu = time.perf_counter(), time.process_time()
            for _ in range(iterations):
                busy_work(units)
                if kind == "logging":
                    log(step=step, value=float(step))
                    step += 1
            times[kind].append((time.perf_counter() - started) / iterations)
            times[f"{kind}_cpu"].append((time.process_time() - cpu) / iterations)
    return times
