"""What the warm starter runs once before it forks any rank, so that no rank
pays for it: one training step of every built-in model.

A rank's first step pays for torch's first calls (kernel selection,
autograd's and the optimizers' set-up) unless the process it was forked from
made them: a forked child's first MLP step took 12 ms when its parent had
never run one, 3 ms after (measured).
"""

from __future__ import annotations

import torch

from ..data import load_dataset
from ..models import build_model, loss_fn

FIRST_STEPS = (("mlp", "digits"), ("cnn", "digits"), ("lm", "sonnets"), ("mlp", "regression"))  # model, data


def first_steps() -> None:
    """One step of each built-in model with each optimizer. On one thread (a
    parallel region would leave a thread pool behind that a forked child
    cannot use), and torch's random state put back: a function that draws
    numbers without seeding gets what it would in a fresh interpreter."""
    threads, random_state = torch.get_num_threads(), torch.get_rng_state()
    torch.set_num_threads(1)
    try:
        for model_name, dataset_name in FIRST_STEPS:
            dataset = load_dataset(dataset_name, seq_len=8)
            model = build_model(model_name, dataset, hidden=16, seq_len=8)
            for optimizer in (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW):
                loss_fn(dataset.task, model(dataset.inputs[:4]), dataset.targets[:4]).backward()
                optimizer(model.parameters(), lr=0.01).step()
    finally:
        torch.set_num_threads(threads)
        torch.set_rng_state(random_state)
