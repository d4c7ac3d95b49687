"""The one worker entry point.

ddlkit's launcher, the CLI and ``accelerate launch -m ddlkit.worker cfg.yaml``
on a cluster all run the code below with the same serialised config, so what
runs in CI on two CPU processes is what runs on eight GPUs.

Every rank: connect its reporter, run the body (``train`` for a built-in
experiment, or the user's function), say "finished" or send its traceback, and
leave with ``os._exit`` (DDP on gloo can abort in interpreter shutdown after a
clean finish; skipping the shutdown is what makes a finished run finish).
"""
from __future__ import annotations

import argparse
import faulthandler
import importlib
import json
import os
import secrets
import signal
import sys
import time
import traceback
from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, NoReturn

import torch
import torch.distributed as dist

from .checkpoint import Checkpointer
from .comm import CommCounter
from .config import RunConfig
from .control import ControlSync, follow_lr
from .data import ShardedStream, load_dataset
from .elastic import attempt_number, faults_for, join_attempt_group
from .memory import MEMORY_STEP, MemoryMeter
from .models import build_model
from .reporter import Reporter
from .stragglers import Straggler
from .strategies import build_strategy


def train(cfg: RunConfig, reporter: Reporter, run_dir: Path) -> dict[str, Any]:
    """What every rank of a built-in experiment does, top to bottom."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    # A peer that hangs must not hold the others forever: the kernel's hang
    # detector fires first, this timeout is the backstop.
    timeout = InitProcessGroupKwargs(timeout=timedelta(seconds=2 * cfg.hang_timeout))
    join_attempt_group(cfg.resolved_device(), timeout.timeout)  # a restarted attempt must not meet the old one's keys
    accelerator = Accelerator(cpu=cfg.resolved_device() == "cpu", kwargs_handlers=[timeout])
    rank, world_size = accelerator.process_index, accelerator.num_processes

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    dataset = load_dataset(cfg.dataset, cfg.seed, cfg.seq_len)
    model = build_model(cfg.model, dataset, cfg.hidden, cfg.seq_len)
    strategy = build_strategy(cfg, accelerator, model, dataset.task)
    # Data is sharded over the data-parallel ranks: ranks of one model replica
    # (pipeline stages, tensor shards) see the same batch.
    shard = ShardedStream(len(dataset), cfg.batch_size, strategy.dp_rank, strategy.dp_size, cfg.seed)
    straggler = Straggler(cfg, rank, reporter)
    if hasattr(strategy, "run"):  # not lockstep (parameter servers): the strategy owns its loop
        return strategy.run(dataset, shard, ControlSync(reporter, rank, world_size, collective=False),
                            straggler, reporter, run_dir)
    controls = ControlSync(reporter, rank, world_size)
    checkpoints = Checkpointer(cfg, strategy, run_dir, rank, world_size)
    first_step, saved_lr = checkpoints.restore(os.environ.get("DDLKIT_RESUME"))
    lr = cfg.lr if saved_lr is None else saved_lr  # the optimizer's state brought its own
    faults = faults_for(cfg, rank, attempt_number())

    started = time.perf_counter()
    steps_done = first_step
    for step in range(first_step, cfg.steps):
        live = controls.at_step(step)  # the same on every rank, at the same step
        if live.stop:
            break
        lr = follow_lr(live, lr, strategy.set_lr)
        step_start = time.perf_counter()
        index = shard.indices(step)
        inputs = dataset.inputs[index].to(accelerator.device)
        targets = dataset.targets[index].to(accelerator.device)
        wait_s = time.perf_counter() - step_start

        if step in faults:
            inject_fault(faults[step], step)
        measure = step == min(MEMORY_STEP, cfg.steps - 1)  # once per run: `memory` and `comm` events per rank
        with (MemoryMeter(strategy.optimizer) if measure else nullcontext()) as meter, \
                (CommCounter() if measure else nullcontext()) as comm:
            stats = strategy.step(inputs, targets)
        if measure:
            reporter.send({"type": "memory", "step": step, **meter.measured()})
            reporter.send({"type": "comm", "step": step, **comm.measured()})
        for event in stats.events:  # e.g. pipeline spans; the reporter sends them in its batches
            reporter.send({**event, "step": step})
        straggler.delay(live, step_start)  # a straggler, for teaching (slowdown, delay_s, delay_jitter_s)
        steps_done = step + 1

        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            reporter.step(  # the loss stays a tensor until sent: no sync in the step
                step, loss=stats.loss, samples=len(index), lr=lr,
                step_time=time.perf_counter() - step_start,
                compute_s=stats.compute_s, comm_s=stats.comm_s, wait_s=wait_s,
            )
        else:
            reporter.last_step = step  # progress for the hang detector, no event
        if checkpoints.due(steps_done) and steps_done < cfg.steps:
            checkpoint_event(reporter, checkpoints.save(steps_done, lr), steps_done)
    train_s = time.perf_counter() - started
    stopped = steps_done < cfg.steps
    if stopped and cfg.checkpoint_every is not None and not checkpoints.due(steps_done):  # keep this step's state
        checkpoint_event(reporter, checkpoints.save(steps_done, lr), steps_done)

    state = strategy.full_state_dict()
    if rank == 0:
        save_atomic(state, run_dir / "final_state.pt")
    trained = steps_done - first_step
    return {"steps": steps_done, "samples": trained * cfg.batch_size * strategy.dp_size, "train_s": train_s,
            "stopped": stopped}


def checkpoint_event(reporter: Reporter, path: Path | None, next_step: int) -> None:
    if path is not None:  # rank 0 finished it
        reporter.send({"type": "checkpoint", "step": next_step, "path": str(path)}, now=True)


def inject_fault(kind: str, step: int) -> None:
    """Fail on purpose, the ways real workers fail (teaching and tests)."""
    if kind == "exception":
        raise RuntimeError(f"injected fault at step {step}")
    if kind == "exit":
        os._exit(3)
    if kind == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    while kind == "hang":
        time.sleep(1)


def save_atomic(obj: Any, path: Path) -> None:
    """Write then rename, so a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def serve(rank: int, run_dir: Path, body: Callable[[Reporter], Any]) -> NoReturn:
    """Run one rank's body and report how it ended; never returns."""
    # Fatal errors and the stacks the kernel asks of a hung rank go to this
    # rank's own stderr (a forked rank inherits the kernel's faulthandler file).
    faulthandler.enable(file=sys.stderr)
    faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
    reporter = Reporter.from_env(rank, run_dir)
    reporter.activate()
    code = 1
    try:
        returned = body(reporter)
        if dist.is_initialized():
            dist.destroy_process_group()
        reporter.send({"type": "finished", **(returned if isinstance(returned, dict) else {})}, now=True)
        code = 0
    except SystemExit as exc:  # sys.exit(0) inside a user's function is a clean end
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if code == 0:
            reporter.send({"type": "finished"}, now=True)
    except BaseException:
        text = traceback.format_exc()
        sys.stderr.write(text)
        reporter.error(text)
    finally:
        reporter.close()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def run_function(fn: Callable[..., Any], args: tuple, rank: int, run_dir: Path) -> Callable[[Reporter], Any]:
    """The body for a user's training function: call it, keep what it returns."""

    def body(_reporter: Reporter) -> None:
        value = fn(*args)
        if value is not None:
            save_atomic(value, run_dir / f"return-rank{rank}.pt")

    return body


def import_function(path: str) -> Callable[..., Any]:
    """'package.module:function' -> the function."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def agreed_run_id() -> str:
    """A run folder name that all ranks started by another launcher share: the
    launcher's run id, or else one that the first rank proposes in the store
    that torchrun's (and accelerate launch's) agent hosts for every rank."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    if run_id != "none":
        return run_id
    proposal = time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return proposal  # a single process
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=timedelta(seconds=60))
    return store.compare_set("ddlkit/run_id", "", proposal).decode()


def main(argv: list[str] | None = None) -> NoReturn:
    parser = argparse.ArgumentParser(prog="python -m ddlkit.worker", description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", help="a RunConfig as YAML or JSON")
    parser.add_argument("--function", help="'module:function' to run instead of a built-in experiment")
    opts = parser.parse_args(argv)
    if not opts.config and not opts.function:
        parser.error("give a config file or --function module:function")
    rank = int(os.environ.get("RANK", "0"))
    if opts.function:
        run_dir = Path(os.environ.get("DDLKIT_RUN_DIR", "runs/standalone"))
        args = tuple(json.loads(os.environ.get("DDLKIT_ARGS", "[]")))
        serve(rank, run_dir, run_function(import_function(opts.function), args, rank, run_dir))
    cfg = RunConfig.load(opts.config)
    cfg.validate()
    run_dir = Path(os.environ.get("DDLKIT_RUN_DIR") or Path(cfg.run_dir) / agreed_run_id())
    run_dir.mkdir(parents=True, exist_ok=True)
    if rank == 0 and not (run_dir / "config.json").exists():
        cfg.save(run_dir / "config.json")
    serve(rank, run_dir, lambda reporter: train(cfg, reporter, run_dir))


if __name__ == "__main__":
    main()
