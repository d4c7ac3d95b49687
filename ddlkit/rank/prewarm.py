"""What a spare rank runs while it waits for its request, so that the rank it
becomes does not: one training step of every built-in model, then one DDP
step in a process group of its own.

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

The rank's start-up through a group (gloo's set-up, DDP's construction and
first step, the collectives of the rank loop) was cold in a spare as well:
with a one-rank group warmed in each spare, a launch's first row came at 34
against 39 ms (medians of 20 alternating launches from one kernel, 1.5 s
apart; docs/starting.md).
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from ..data import load_dataset
from ..models import build_model, loss_fn
from .emulated import register, unmetered

FIRST_STEPS = (("mlp", "digits"), ("cnn", "digits"), ("lm", "sonnets"), ("mlp", "regression"))  # model, data


def warm_up(stop: Callable[[], bool] = lambda: False) -> None:
    """All of a spare's warm-up, until ``stop()`` (asked before each step)."""
    first_steps(stop)
    if not stop():
        first_collectives()


def first_steps(stop: Callable[[], bool] = lambda: False) -> None:
    """One step of each built-in model with each optimizer, until ``stop()``
    (asked before each). torch's random state is put back: a function that
    draws numbers without seeding gets what it would in a fresh interpreter."""
    with one_thread_same_numbers():
        for model_name, dataset_name in FIRST_STEPS:
            dataset = load_dataset(dataset_name, seq_len=8)
            model = build_model(model_name, dataset, hidden=16, seq_len=8)
            for optimizer in (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW):
                if stop():
                    return
                loss_fn(dataset.task, model(dataset.inputs[:4]), dataset.targets[:4]).backward()
                optimizer(model.parameters(), lr=0.01).step()


def first_collectives() -> None:
    """What a rank of a lockstep strategy does through its group, in a group of
    one: the group made by ddlkit's backend (gloo on loopback), a DDP step with
    a communication hook, the control broadcast and the idle-time all-reduce;
    then the group destroyed. Nothing is left: no thread, socket or group, and
    the next group is numbered as in a fresh process, so a warmed rank and one
    that was not meet under the same keys. Linux only (``lo``, as ranks use);
    uncounted by the emulated network."""
    if sys.platform != "linux" or dist.is_initialized() or not has_loopback():
        return
    with one_thread_same_numbers(), gloo_on_loopback(), unmetered():
        dist.init_process_group(register(), store=dist.HashStore(), rank=0, world_size=1)
        try:
            dataset = load_dataset("digits", seq_len=8)
            model = DistributedDataParallel(build_model("mlp", dataset, hidden=16, seq_len=8))
            model.register_comm_hook(None, default_hooks.allreduce_hook)
            loss_fn(dataset.task, model(dataset.inputs[:4]), dataset.targets[:4]).backward()
            torch.optim.SGD(model.parameters(), lr=0.01).step()
            dist.broadcast_object_list([{"step": 0}], src=0)
            dist.all_reduce(torch.zeros(1))
            del model  # its reducer holds the group
        finally:
            dist.destroy_process_group()


@contextmanager
def one_thread_same_numbers() -> Iterator[None]:
    """One thread (a parallel region would leave a thread pool behind that a
    forked child cannot use), and torch's random state put back after."""
    threads, random_state = torch.get_num_threads(), torch.get_rng_state()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.set_rng_state(random_state)


def has_loopback() -> bool:
    """Whether the interface ``lo`` exists (where gloo's device is made; without it, no warm-up)."""
    try:
        socket.if_nametoindex("lo")
    except OSError:
        return False
    return True


@contextmanager
def gloo_on_loopback() -> Iterator[None]:
    """gloo's sockets on ``lo`` (not the interface the host name resolves to, nor a DNS lookup)."""
    before = os.environ.get("GLOO_SOCKET_IFNAME")
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    try:
        yield
    finally:
        if before is None:
            del os.environ["GLOO_SOCKET_IFNAME"]
        else:
            os.environ["GLOO_SOCKET_IFNAME"] = before
