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
from ..files import make_dir, run_modes
from ..runid import new_run_id
from .restarts import Restarts
from .resume import continue_run, resume_folder
from .run import Run
from .starter import Starter
from .store import Rendezvous
from .supervisor import Supervisor


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

    Example (it starts worker processes, so it is no doctest)::

        run = ddlkit.launch(ddlkit.RunConfig(strategy="data", world_size=2, steps=5), echo=False)
        run.wait(timeout=120).status   # 'done'
    """
    run_modes()  # a bad DDLKIT_RUN_MODE is refused before anything is written
    if resume is not None:  # the run folder's config, unless another is given
        target = target or RunConfig.load(resume_folder(resume) / "config.json")
    if isinstance(target, RunConfig):
        if args or num_processes is not None:
            raise TypeError(
                "a RunConfig carries its own settings: pass world_size in the config, not num_processes/args"
            )
        target.validate()
        return _start(
            target.world_size,
            target.resolved_device(),
            Path(target.run_dir),
            target.hang_timeout,
            echo,
            config=target,
            resume=None if resume is None else resume_folder(resume),
        )
    if resume is not None:
        raise TypeError("resume= continues a built-in experiment: pass a RunConfig (or none), not a function")
    if not (callable(target) or isinstance(target, str)):
        raise TypeError(f"launch() takes a RunConfig, a function or 'module:function', not {type(target).__name__}")
    world_size = 2 if num_processes is None else num_processes
    check = _function_checks(world_size, device, run_dir, hang_timeout, oversubscribe)
    return _start(
        world_size, check.resolved_device(), Path(check.run_dir), hang_timeout, echo, function=target, args=args
    )


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
) -> Run:
    spawn_name = spawnable_name(function, args, device) if function is not None else None
    target = "config" if config is not None else spawn_name or getattr(function, "__qualname__", repr(function))
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
    starter = Starter(run.path, device, Rendezvous(), ChannelServer(new_token()), config, function, spawn_name, args)
    try:  # the folder's files are opened first: a folder that cannot be written fails before any process starts
        supervisor = Supervisor(run, starter, hang_timeout, say, Restarts(run, config, attempt, announce))
    except BaseException:
        starter.close()
        raise
    supervisor.begin(world_size, attempt, checkpoint)
    return run


def spawnable_name(function: Callable[..., Any] | str, args: tuple[Any, ...], device: str) -> str | None:
    """The 'module:function' to spawn by, or None to fork. A function given by
    name is always spawned; a function object is forked, unless CUDA is already
    initialised in the kernel (a forked child cannot use it), when it must be
    importable by name."""
    if isinstance(function, str):
        module, sep, name = function.partition(":")
        if not (module and sep and name):
            raise ValueError(f"function name {function!r} is invalid: it must look like 'package.module:function'")
        _check_json_args(args)
        return function
    if device != "cuda" or not torch.cuda.is_initialized():
        return None
    module = getattr(function, "__module__", "__main__")
    if module == "__main__" or "<locals>" in function.__qualname__:
        raise RuntimeError(
            "CUDA is already initialised in this kernel, so ddlkit cannot fork workers for a function defined "
            "in the notebook (a forked process cannot use CUDA that its parent initialised). Either restart the "
            "kernel and call ddlkit.launch(fn, ...) before anything touches CUDA, or move the function into a "
            "module and pass 'module:function', which starts fresh interpreters."
        )
    _check_json_args(args)
    return f"{module}:{function.__qualname__}"


def _check_json_args(args: tuple[Any, ...]) -> None:
    try:
        json.dumps(list(args))
    except TypeError as exc:
        raise TypeError(
            f"arguments for a spawned function must be JSON values (numbers, strings, lists, dicts): {exc}"
        ) from None
