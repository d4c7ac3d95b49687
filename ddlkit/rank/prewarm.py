"""What a spare rank runs while it waits for its request, so that the rank it
becomes does not: one training step of every built-in model.

A rank's first step pays for torch's first calls (kernel selection,
autograd's and the optimizers' set-up) and for copying the pages of the
warm starter it touches (a forked child shares its parent's memory until it
writes to it): measured, a forked child's first MLP step took 12 ms cold and
3 ms once its parent had run one, and a launch's first row came at 31-36 ms
(medians of 10, three traces) with spares that warmed themselves, 42 ms with a
starter that did it once for all. In the starter, the same steps also slowed every rank's
later Python by ~4 % (``ddlkit.log`` bursts: 1.08x against 1.04x), so each
spare warms itself, off the launch's path, and stops as soon as its request
comes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..data import load_dataset
from ..models import build_model, loss_fn

FIRST_STEPS = (("mlp", "digits"), ("cnn", "digits"), ("lm", "sonnets"), ("mlp", "regression"))  # model, data


def first_steps(stop: Callable[[], bool] = lambda: False) -> None:
    """One step of each built-in model with each optimizer, until ``stop()``
    (asked before each). On one thread (a parallel region would leave a
    thread pool behind that a forked child cannot use), and torch's random
    state put back: a function that draws numbers without seeding gets what
    it would in a fresh interpreter."""
    threads, random_state = torch.get_num_threads(), torch.get_rng_state()
    torch.set_num_threads(1)
    try:
        for model_name, dataset_name in FIRST_STEPS:
            dataset = load_dataset(dataset_name, seq_len=8)
            model = build_model(model_name, dataset, hidden=16, seq_len=8)
            for optimizer in (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW):
                if stop():
                    return
                loss_fn(dataset.task, model(dataset.inputs[:4]), dataset.targets[:4]).backward()
                optimizer(model.parameters(), lr=0.01).step()
    finally:
        torch.set_num_threads(threads)
        torch.set_rng_state(random_state)
