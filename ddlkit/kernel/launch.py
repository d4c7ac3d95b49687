"""``ddlkit.launch``: start a run in the background and return its Run at once.

Three pieces with one job each: the starter starts one attempt's worker
processes (``ddlkit.kernel.starter``), the supervisor carries their events and
supervises them (``ddlkit.kernel.supervisor``), and the Run is the record the
notebook holds (``ddlkit.kernel.run``). This module only puts them together.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..channel import ChannelServer, new_token
from ..config import RunConfig
from ..events import Restart
from ..files import make_dir, run_modes, write_atomic
from ..runid import new_run_id
from .pickled import pickle_function
from .restarts import Restarts
from .resume import continue_run, resume_folder
from .run import Run
from .starter import Starter
from .store import next_rendezvous
from .supervisor import Supervisor

START_MODES = ("auto", "warm", "spawn")
PICKLED = "function.pkl"  # in the run folder: a cloudpickled notebook function and its arguments


def launch(
    target: RunConfig | Callable[..., Any] | str | None = None,
    *args: Any,
    num_processes: int | None = None,
    device: str = "auto",
    run_dir: str | os.PathLike[str] = "runs",
    hang_timeout: float | None = None,
    echo: bool | Callable[[str], None] = True,
    resume: str | os.PathLike[str] | None = None,
    oversubscribe: bool = False,
    start: str | None = None,
) -> Run:
    """Start a run in the background and return its :class:`Run` at once.

    ``target`` is a :class:`RunConfig` (a built-in experiment), a training
    function (like ``accelerate.notebook_launcher``: a plain ``Accelerator()``
    inside it joins one ``num_processes``-rank group, on CPU too), or the
    importable name ``"module:function"`` of one. Worker output reaches
    ``echo`` (print, by default) tagged by rank. The run's folder and every
    file in it are yours alone (0700/0600) unless ``DDLKIT_RUN_MODE`` says
    otherwise (docs/security.md).

    ``oversubscribe=True`` lets a function run more processes than
    ``ddlkit.limits.RANKS_PER_CORE`` per CPU core (a RunConfig has the same field).

    ``resume="runs/<id>"`` continues that run (its folder, events and run id)
    from its newest valid checkpoint, with the folder's config unless a
    RunConfig is given (see ``ddlkit.kernel.resume``).

    ``start`` ("auto", "warm" or "spawn"; default ``DDLKIT_START``, else
    "auto") says how ranks start: see :func:`start_mode`.

    Example (it starts worker processes, so it is no doctest)::

        run = ddlkit.launch(ddlkit.RunConfig(strategy="data", world_size=2, steps=5), echo=False)
        run.wait(timeout=120).status   # 'done'
    """
    run_modes()  # a bad DDLKIT_RUN_MODE is refused before anything is written
    start = start_mode(start)
    if resume is not None:  # the run folder's config, unless another is given
        target = target or RunConfig.load(resume_folder(resume) / "config.json")
    if isinstance(target, RunConfig):
        if args or num_processes is not None:
            raise TypeError(
                "a RunConfig carries its own settings: pass world_size in the config, not num_processes/args"
            )
        target.validate()
        config_at = (target.world_size, target.resolved_device(), Path(target.run_dir), target.hang_timeout, echo)
        folder = None if resume is None else resume_folder(resume)
        return _start(*config_at, config=target, resume=folder, warm=start != "spawn")
    if resume is not None:
        raise TypeError("resume= continues a built-in experiment: pass a RunConfig (or none), not a function")
    if not (callable(target) or isinstance(target, str)):
        raise TypeError(f"launch() takes a RunConfig, a function or 'module:function', not {type(target).__name__}")
    world_size = 2 if num_processes is None else num_processes
    check = _function_checks(world_size, device, run_dir, hang_timeout, oversubscribe)
    argv, payload = function_plan(target, args, start)  # a capture that cannot be pickled is refused here
    where = (world_size, check.resolved_device(), Path(check.run_dir), hang_timeout, echo)
    return _start(*where, function=target, args=args, argv=argv, payload=payload, warm=start != "spawn")


def _function_checks(
    world_size: int, device: str, run_dir: str | os.PathLike[str], hang_timeout: float | None, oversubscribe: bool
) -> RunConfig:
    """A launched function's settings, checked as a built-in run's (the same messages)."""
    check = RunConfig(strategy="data", world_size=world_size, device=device, batch_size=1, run_dir=run_dir)
    check = check.replace(hang_timeout=hang_timeout or 1.0, oversubscribe=oversubscribe)
    check.validate()
    return check


def _start(
    world_size: int,
    device: str,
    runs_root: Path,
    hang_timeout: float | None,
    echo: bool | Callable[[str], None],
    config: RunConfig | None = None,
    function: Callable[..., Any] | str | None = None,
    args: tuple[Any, ...] = (),
    resume: Path | None = None,
    argv: list[str] | None = None,
    payload: bytes | None = None,
    warm: bool = True,
) -> Run:
    target = "config" if config is not None else getattr(function, "__qualname__", function)
    say = (lambda line: print(line, flush=True)) if echo is True else (echo or None)
    if resume is None:
        run_id = new_run_id()
        path = make_dir(make_dir(runs_root) / run_id, exist_ok=False)  # 0700 unless DDLKIT_RUN_MODE says
        run = Run(run_id, path, world_size, time.time(), meta={"target": target, "device": device})
        announce: list[Restart] = []
        attempt, checkpoint = 0, None
    else:  # the same run folder, its events, and attempt numbers that go on
        run, announce, checkpoint = continue_run(resume, world_size, say or (lambda line: None))
        attempt = announce[0]["attempt"]
    if config is not None:
        run.meta["strategy"] = config.strategy
        argv = [str(run.path / "config.json")]
    if payload is not None:  # the ranks load it: a notebook function, cloudpickled
        write_atomic(run.path / PICKLED, lambda file: file.write(payload))
        argv = ["--pickled", str(run.path / PICKLED)]
    callable_function = function if callable(function) else None
    starter = Starter(
        run.path, device, next_rendezvous(), ChannelServer(new_token()), config, callable_function, args, argv, warm
    )
    try:  # the folder's files are opened first: a folder that cannot be written fails before any process starts
        supervisor = Supervisor(run, starter, hang_timeout, say, Restarts(run, config, attempt, announce))
    except BaseException:
        starter.close()
        raise
    supervisor.begin(world_size, attempt, checkpoint)
    return run


def start_mode(start: str | None) -> str:
    """``start`` checked, from ``DDLKIT_START`` when not given. ``"auto"``: ranks
    are forked from the warm starter, a process with torch imported and CUDA
    untouched (``ddlkit.kernel.forkserver``), except that a function object is
    forked from the kernel while no CUDA is initialised there, and cloudpickled
    to the starter once it is. ``"warm"``: the starter, and functions always
    cloudpickled. ``"spawn"``: a fresh ``python -m ddlkit.worker`` per rank
    (slower; nothing shared, for debugging).

    >>> start_mode("spawn")
    'spawn'
    >>> start_mode("fast")
    Traceback (most recent call last):
    ...
    ValueError: start='fast' is invalid: give 'auto', 'warm' or 'spawn' (or set DDLKIT_START to one)
    """
    start = start or os.environ.get("DDLKIT_START", "").strip() or "auto"
    if start not in START_MODES:
        raise ValueError(f"start={start!r} is invalid: give 'auto', 'warm' or 'spawn' (or set DDLKIT_START to one)")
    return start


def fork_is_safe() -> bool:
    """Whether the kernel may fork ranks: it can fork, and no CUDA is initialised
    in it (a forked child cannot use CUDA that its parent initialised)."""
    return hasattr(os, "fork") and not torch.cuda.is_initialized()


def function_plan(
    function: Callable[..., Any] | str, args: tuple[Any, ...], start: str
) -> tuple[list[str] | None, bytes | None]:
    """How the ranks run a function: (their worker arguments, the cloudpickled
    function and args to hand them). No arguments: fork the kernel. A function
    given by name is imported by the ranks; a function object is forked while
    that is safe (``start="auto"``), else cloudpickled (``ddlkit.kernel.pickled``)."""
    if isinstance(function, str):
        module, sep, name = function.partition(":")
        if not (module and sep and name):
            raise ValueError(f"function name {function!r} is invalid: it must look like 'package.module:function'")
        _check_json_args(args)
        return ["--function", function], None
    if start == "auto" and fork_is_safe():
        return None, None
    return ["--pickled", PICKLED], pickle_function(function, args)


def _check_json_args(args: tuple[Any, ...]) -> None:
    try:
        json.dumps(list(args))
    except TypeError as exc:
        raise TypeError(
            f"arguments for a spawned function must be JSON values (numbers, strings, lists, dicts): {exc}"
        ) from None
