"""The one rank loop: what every rank of a built-in experiment does, whatever
its strategy.

It owns what all strategies share: the process group, the seeded model and
data, live controls, injected faults, stragglers, step rows, progress for the
hang detector, checkpoints, and the one step whose memory and communication
are measured. The strategy (``ddlkit.rank.strategy``) only says how one rank
takes one step, or, on a serving rank, runs its own ticks through
``ctx.tick``.
"""

from __future__ import annotations

import dataclasses
import os
import time
from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .. import events, registry
from ..checkpoint import Checkpointer
from ..config import RunConfig
from ..data import Dataset, ShardedStream, held_out_split, load_dataset, subset
from ..files import save_torch
from ..models import build_model
from ..network import link_of
from .comm import CommCounter
from .emulated import NETWORK, unmetered
from .evaluate import HeldOut
from .faults import attempt_number, faults_for, inject_fault
from .group import join_attempt_group
from .memory import MEMORY_STEP, MemoryMeter
from .reporter import Reporter
from .stragglers import Straggler
from .strategy import RankContext, StepStats, Strategy, make_optimizer
from .sync import ControlSync


def train(cfg: RunConfig, reporter: Reporter, run_dir: Path) -> dict[str, Any]:
    """Build this rank's strategy, run its steps (or serve), save the result."""
    from accelerate import Accelerator  # deferred: a second of import, only in workers
    from accelerate.utils import InitProcessGroupKwargs

    # A peer that hangs must not hold the others forever: the kernel's hang
    # detector fires first, this timeout is the backstop.
    timeout = InitProcessGroupKwargs(timeout=timedelta(seconds=2 * cfg.hang_timeout))
    NETWORK.link = link_of(cfg.network)  # before the first collective (live: RankContext.follow)
    join_attempt_group(cfg.resolved_device(), timeout.timeout)  # a restarted attempt must not meet the old one's keys
    accelerator = Accelerator(cpu=cfg.resolved_device() == "cpu", kwargs_handlers=[timeout])
    rank, world_size = accelerator.process_index, accelerator.num_processes

    seed(cfg.seed, accelerator.device)  # identical initial weights on every rank
    dataset = load_dataset(cfg.dataset, cfg.seed, cfg.seq_len)
    model = build_model(cfg.model, dataset, cfg.hidden, cfg.seq_len)
    spec = registry.get(cfg.strategy)
    dataset, held_out = held_out_data(cfg, dataset, model, evaluates=rank == spec.evaluator(cfg))
    strategy: Strategy = spec.build(cfg, accelerator, model, dataset.task, make_optimizer(cfg))
    # Data is sharded over the data-parallel ranks: ranks of one model replica
    # (pipeline stages, tensor shards) see the same batch.
    ctx = RankContext(
        cfg,
        rank,
        world_size,
        accelerator.device,
        reporter,
        ControlSync(reporter, rank, world_size, collective=spec.lockstep),
        Straggler(cfg, rank, reporter),
        faults_for(cfg, rank, attempt_number()),
        run_dir,
        dataset,
        ShardedStream(
            len(dataset), cfg.batch_size * spec.accumulation(cfg), strategy.dp_rank, strategy.dp_size, cfg.seed
        ),
        cfg.lr,
        held_out=held_out,
    )
    strategy.setup(ctx)
    reporter.mark_started()  # every rank has joined the group: from here a rank without steps hangs
    summary = strategy.serve(ctx) if strategy.serves() else run_steps(ctx, strategy, spec)
    summary.update(strategy.finish(ctx))
    summary.update(NETWORK.totals())
    state = strategy.full_state_dict()
    if rank == 0:
        save_torch(state, run_dir / "final_state.pt")
    return summary


def seed(value: int, device: torch.device) -> None:
    """Seed this rank's generator. On CPU, the CPU generator alone: ``torch.manual_seed`` also queues a
    seed for each accelerator backend not yet initialised, formatting the caller's stack for each
    (4-5 ms in a freshly forked rank, measured: a tenth of a launch)."""
    if device.type == "cpu":
        torch.default_generator.manual_seed(value)
    else:
        torch.manual_seed(value)


def held_out_data(
    cfg: RunConfig, dataset: Dataset, model: torch.nn.Module, evaluates: bool
) -> tuple[Dataset, HeldOut | None]:
    """With ``eval_every``: the samples every rank trains on (the held-out ones
    removed) and, on the evaluating rank, the held-out samples with a copy of
    the model made before the strategy wraps, cuts or shards it."""
    if cfg.eval_every is None:
        return dataset, None
    train, test = held_out_split(dataset, cfg.seed)
    return subset(dataset, train), HeldOut(model, subset(dataset, test)) if evaluates else None


def run_steps(ctx: RankContext, strategy: Strategy, spec: registry.StrategySpec) -> dict[str, Any]:
    """The steps of one rank, from the checkpoint the kernel chose (if any)."""
    cfg, reporter = ctx.cfg, ctx.reporter
    checkpoints = Checkpointer(cfg, strategy, ctx.run_dir, ctx.rank, ctx.world_size) if spec.checkpoint else None
    first_step, saved_lr = checkpoints.restore(os.environ.get("DDLKIT_RESUME")) if checkpoints else (0, None)
    ctx.lr = ctx.lr if saved_lr is None else saved_lr  # the optimizer's state brought its own

    started, steps_done = time.perf_counter(), first_step
    ctx.evaluate(first_step, strategy, everyone=spec.lockstep)
    for step in range(first_step, cfg.steps):
        live = ctx.controls.at_step(step)  # the same on every lockstep rank, at the same step
        if live.stop:
            break
        ctx.follow(live, strategy)
        step_start = time.perf_counter()
        index = ctx.shard.indices(step)
        inputs = ctx.dataset.inputs[index].to(ctx.device)
        targets = ctx.dataset.targets[index].to(ctx.device)
        wait_s = time.perf_counter() - step_start
        if step in ctx.faults:
            inject_fault(ctx.faults[step], step)
        ctx.straggled, ctx.step, ctx.step_started = False, step, step_start
        network_before, bytes_before = NETWORK.seconds, NETWORK.payload_bytes
        stats = measured_step(ctx, strategy, step, inputs, targets)
        for event in stats.events:  # e.g. pipeline spans; the reporter sends them in its batches
            reporter.send({**event, "step": step})
        if not ctx.straggled:
            ctx.straggle(step_start)  # a straggler, for teaching (slowdown, delay_s, delay_jitter_s)
        if spec.lockstep and ctx.world_size > 1 and step % cfg.time_every == 0 and "idle_s" not in stats.row:
            stats = with_idle(stats, ctx.device)  # the strategy did not split its communication (data's hook does)
        steps_done = step + 1
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            reporter.step(  # the loss stays a tensor until sent: no sync in the step
                step,
                loss=stats.loss,
                samples=len(index),
                lr=ctx.lr,
                step_time=time.perf_counter() - step_start,
                compute_s=stats.compute_s,
                comm_s=stats.comm_s,
                **{"wait_s": wait_s, **stats.row},
                network_s=NETWORK.seconds - network_before,
                comm_bytes=NETWORK.payload_bytes - bytes_before,
            )
        else:
            reporter.last_step = step  # progress for the hang detector, no event
        ctx.evaluate(steps_done, strategy, everyone=spec.lockstep)
        if checkpoints and checkpoints.due(steps_done) and steps_done < cfg.steps:
            reporter.flush()  # this rank's rows go out before the checkpoint can make them unredoable
            checkpoint_event(reporter, checkpoints.save(steps_done, ctx.lr), steps_done)
    train_s = time.perf_counter() - started
    stopped = steps_done < cfg.steps
    if stopped:
        ctx.evaluate(steps_done, strategy, everyone=spec.lockstep, stopped=True)
    # Stopped at a step: keep its state if a relaunch asked (it goes on from it) or checkpoints are on.
    keep = ctx.controls.current.save or cfg.checkpoint_every is not None
    if stopped and checkpoints and keep and not checkpoints.due(steps_done):
        checkpoint_event(reporter, checkpoints.save(steps_done, ctx.lr), steps_done)
    samples = (steps_done - first_step) * cfg.batch_size * spec.accumulation(cfg) * strategy.dp_size
    return {"steps": steps_done, "samples": samples, "train_s": train_s, "stopped": stopped}


def with_idle(stats: StepStats, device: torch.device) -> StepStats:
    """The step with the wait for the slowest peer measured after it: a
    one-element all-reduce returns when the last rank arrives. That wait is
    the step's ``idle_s``; what the strategy timed as communication is its
    ``transfer_s`` (zero for one whose collectives are inside the compute,
    fsdp and tensor)."""
    start = time.perf_counter()
    with unmetered():  # a probe, not the run's traffic: neither delayed nor counted
        dist.all_reduce(torch.zeros(1, device=device))  # on the ranks' device: NCCL reduces only CUDA tensors
    idle_s = time.perf_counter() - start
    row = {**stats.row, "idle_s": idle_s, "transfer_s": stats.comm_s}
    return dataclasses.replace(stats, comm_s=stats.comm_s + idle_s, row=row)


def measured_step(
    ctx: RankContext, strategy: Strategy, step: int, inputs: torch.Tensor, targets: torch.Tensor
) -> StepStats:
    """The strategy's step; once per run (``MEMORY_STEP``) with its memory and
    communication measured and sent as ``memory`` and ``comm`` events."""
    if step != min(MEMORY_STEP, ctx.cfg.steps - 1):
        return strategy.step(inputs, targets)
    optimizer = strategy.optimizer
    before = NETWORK.totals()
    with MemoryMeter(optimizer) if optimizer is not None else nullcontext() as meter, CommCounter() as comm:
        stats = strategy.step(inputs, targets)
    if meter is not None:
        ctx.reporter.send(meter.event(step))
    after = NETWORK.totals()
    wire, seconds = int(after["wire_bytes"] - before["wire_bytes"]), after["network_s"] - before["network_s"]
    event = comm.event(step)
    event.update(wire_bytes=wire, network_s=seconds)
    ctx.reporter.send(event)
    return stats


def checkpoint_event(reporter: Reporter, path: Path | None, next_step: int) -> None:
    if path is not None:  # rank 0 finished it
        reporter.send(events.Checkpoint(type="checkpoint", step=next_step, path=str(path)), now=True)
