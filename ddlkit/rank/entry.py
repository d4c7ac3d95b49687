"""The one worker entry point (``python -m ddlkit.worker``).

ddlkit's launcher, the CLI and ``accelerate launch -m ddlkit.worker cfg.yaml``
on a cluster all run the code below with the same serialised config, so what
runs in CI on two CPU processes is what runs on eight GPUs.

Every rank: connect its reporter, run the body (the rank loop for a built-in
experiment, or the user's function), say "finished" or send its traceback,
and leave with ``os._exit`` (DDP on gloo can abort in interpreter shutdown
after a clean finish; skipping the shutdown is what makes a finished run finish).
"""

from __future__ import annotations

import argparse
import faulthandler
import importlib
import json
import os
import pickle
import signal
import sys
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, NoReturn

import torch.distributed as dist

from .. import events
from ..config import RunConfig
from ..files import check_own_dir, make_dir, save_torch, set_file_mode
from ..runid import check_folder_name, is_run_id, new_run_id
from .accelerate_state import see_the_group
from .elastic import describe_run, restarts_left, resume_after_restart, watch_control_file
from .group import leave_group
from .loop import train
from .reporter import Reporter


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
        leave_group()
        summary = returned if isinstance(returned, dict) else {}  # the rank loop's; a function's body returns None
        reporter.send(events.Finished(type="finished", **summary), now=True)
        code = 0
    except SystemExit as exc:  # sys.exit(0) inside a user's function is a clean end
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if code == 0:
            reporter.send(events.Finished(type="finished"), now=True)
    except BaseException:
        text = traceback.format_exc()
        if not reporter.to_kernel:  # the kernel shows it once, in RunFailed, and keeps it in rank<r>.log
            sys.stderr.write(text)
        reporter.error(text, restarting=restarts_left() > 0)
    finally:
        reporter.close()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def run_function(fn: Callable[..., Any], args: tuple[Any, ...], rank: int, run_dir: Path) -> Callable[[Reporter], None]:
    """The body for a user's training function: call it, keep what it returns."""

    def body(_reporter: Reporter) -> None:
        see_the_group()  # PartialState(), AcceleratorState(), Accelerator(): one N-rank group, in any order
        value = fn(*args)
        if value is not None:
            save_torch(value, run_dir / f"return-rank{rank}.pt")

    return body


def run_pickled(path: Path, rank: int, run_dir: Path) -> Callable[[Reporter], None]:
    """The body for a function the kernel cloudpickled (``ddlkit.kernel.pickled``),
    loaded inside the body so that a failure to load it is reported like any other.
    The kernel's import path comes first: the function may live in a module the
    kernel imported from a folder it added to ``sys.path``."""

    def body(reporter: Reporter) -> None:
        with path.open("rb") as file:
            kernel_path: list[str] = pickle.load(file)
            sys.path[:] = kernel_path + [entry for entry in sys.path if entry not in kernel_path]
            function, args = pickle.load(file)
        run_function(function, args, rank, run_dir)(reporter)

    return body


def import_function(path: str) -> Callable[..., Any]:
    """'package.module:function' -> the function."""
    module, _, name = path.partition(":")
    function: Callable[..., Any] = getattr(importlib.import_module(module), name)
    return function


def agreed_run_id() -> str:
    """A run folder name that all ranks started by another launcher share: the
    launcher's run id, or else one that the first rank proposes in the store
    that torchrun's (and accelerate launch's) agent hosts for every rank. That
    store is open to every local user, so what it holds must be an id in
    ddlkit's own format, never a path."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    if run_id != "none":
        return check_folder_name(run_id, "TORCHELASTIC_RUN_ID (torchrun's --rdzv-id)")
    proposal = new_run_id()
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return proposal  # a single process
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timedelta(seconds=60)
    )
    agreed = store.compare_set("ddlkit/run_id", "", proposal).decode(errors="replace")
    if not is_run_id(agreed):
        raise ValueError(
            f"the run id in the launcher's store (key 'ddlkit/run_id') is {agreed[:80]!r}, not one a ddlkit rank "
            "proposes (like 20261124-221727-b63606): another process wrote it, and it will not be used as a "
            "folder name. Give the ranks one with torchrun --rdzv-id NAME"
        )
    return agreed


def unattended(run_dir: Path, rank: int, reporter: Reporter) -> Reporter:
    """A rank of another launcher: resume after its restart, and take controls from the control file."""
    resume_after_restart(run_dir, rank, reporter)
    watch_control_file(run_dir, reporter)
    return reporter


def main(argv: list[str] | None = None) -> NoReturn:
    parser = argparse.ArgumentParser(prog="python -m ddlkit.worker", description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", help="a RunConfig as YAML or JSON")
    parser.add_argument("--function", help="'module:function' to run instead of a built-in experiment")
    parser.add_argument("--pickled", help="a file of (function, args) that ddlkit's launcher cloudpickled")
    opts = parser.parse_args(argv)
    if not opts.config and not opts.function and not opts.pickled:
        parser.error("give a config file, --function module:function or --pickled FILE")
    rank = int(os.environ.get("RANK", "0"))
    if opts.pickled:  # written by this user's kernel into the run's private folder (ddlkit.kernel.pickled)
        run_dir = Path(os.environ.get("DDLKIT_RUN_DIR", "runs/standalone"))
        serve(rank, run_dir, run_pickled(Path(opts.pickled), rank, run_dir))
    if opts.function:
        run_dir = Path(os.environ.get("DDLKIT_RUN_DIR", "runs/standalone"))
        args = tuple(json.loads(os.environ.get("DDLKIT_ARGS", "[]")))
        serve(rank, run_dir, run_function(import_function(opts.function), args, rank, run_dir))
    if os.environ.get("DDLKIT_RUN_DIR"):  # started by ddlkit: even a config that fails here is reported
        run_dir = Path(os.environ["DDLKIT_RUN_DIR"])
        serve(rank, run_dir, lambda reporter: train(read_config(opts.config), reporter, run_dir))
    cfg = read_config(opts.config)  # started by another launcher: the folder comes from the config
    ranks = int(os.environ.get("WORLD_SIZE", cfg.world_size))
    if ranks != cfg.world_size:
        raise ValueError(
            f"{opts.config} has world_size: {cfg.world_size}, but the launcher started {ranks} ranks (WORLD_SIZE): "
            f"set world_size: {ranks} in the config, or start {cfg.world_size} ranks"
        )
    run_dir = Path(cfg.run_dir) / agreed_run_id()
    check_own_dir(make_dir(run_dir))  # private; refused if someone else made it
    if rank == 0 and not (run_dir / "config.json").exists():
        cfg.save(run_dir / "config.json")
        set_file_mode(run_dir / "config.json")
    describe_run(run_dir, rank)
    serve(rank, run_dir, lambda reporter: train(cfg, unattended(run_dir, rank, reporter), run_dir))


def read_config(path: str) -> RunConfig:
    """The config file, checked as the kernel checked it."""
    cfg = RunConfig.load(path)
    cfg.validate()
    return cfg
