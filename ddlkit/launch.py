"""Starting workers: ``ddlkit.launch`` returns a live Run at once.

Three small pieces, each with one job: the rendezvous store every rank meets
at, the environment each rank is given, and starting one worker process
(spawned for built-in experiments and importable functions, forked for
functions defined in a notebook). Carrying events and supervising are the
collector's job (``ddlkit.collector``).
"""
from __future__ import annotations

import io
import json
import os
import secrets
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch  # here rather than in launch(): the first import costs a second
from torch.distributed import TCPStore

from .channel import ChannelServer, new_token
from .config import RunConfig
from .elastic import continue_run, resume_folder
from .run import Run
from .supervise import ForkedProcess, RankState


def launch(
    target: RunConfig | Callable[..., Any] | str | None = None,
    *args: Any,
    num_processes: int | None = None,
    device: str = "auto",
    run_dir: str = "runs",
    hang_timeout: float | None = None,
    echo: bool | Callable[[str], None] = True,
    resume: str | os.PathLike | None = None,
) -> Run:
    """Start a run in the background and return its :class:`Run` at once.

    ``target`` is a :class:`RunConfig` (a built-in experiment), a training
    function (like ``accelerate.notebook_launcher``: a plain ``Accelerator()``
    inside it joins one ``num_processes``-rank group, on CPU too), or the
    importable name ``"module:function"`` of one. Worker output reaches
    ``echo`` (print, by default) tagged by rank.

    ``resume="runs/<id>"`` continues that run (its folder, events and run id)
    from its newest valid checkpoint, with the folder's config unless a
    RunConfig is given (see ``ddlkit.elastic``).

    >>> import ddlkit
    >>> run = ddlkit.launch(ddlkit.RunConfig(strategy="data", world_size=2, steps=5), echo=False)
    >>> run.wait(timeout=120).status
    'done'
    """
    if resume is not None:  # the run folder's config, unless another is given
        target = target or RunConfig.load(resume_folder(resume) / "config.json")
    if isinstance(target, RunConfig):
        if args or num_processes is not None:
            raise TypeError("a RunConfig carries its own settings: pass world_size in the config, not num_processes/args")
        target.validate()
        return _start(target.world_size, target.resolved_device(), Path(target.run_dir), target.hang_timeout,
                      echo, config=target, resume=None if resume is None else resume_folder(resume))
    if resume is not None:
        raise TypeError("resume= continues a built-in experiment: pass a RunConfig (or none), not a function")
    if not (callable(target) or isinstance(target, str)):
        raise TypeError(f"launch() takes a RunConfig, a function or 'module:function', not {type(target).__name__}")
    world_size = 2 if num_processes is None else num_processes
    check = RunConfig(strategy="data", world_size=world_size, device=device, hang_timeout=hang_timeout or 1.0)
    check.validate()  # the same messages for world size and device as a built-in run
    return _start(world_size, check.resolved_device(), Path(run_dir), hang_timeout, echo, function=target, args=args)


def _start(world_size: int, device: str, runs_root: Path, hang_timeout: float | None,
           echo: bool | Callable[[str], None], config: RunConfig | None = None,
           function: Callable[..., Any] | str | None = None, args: tuple = (), resume: Path | None = None) -> Run:
    spawn_name = _spawnable_name(function, args, device) if function is not None else None
    target = "config" if config is not None else spawn_name or getattr(function, "__qualname__", repr(function))
    if resume is None:
        run_id = time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)
        path = runs_root / run_id
        path.mkdir(parents=True)
        run = Run(run_id, path, world_size, time.time(), meta={"target": target, "device": device})
        announce, attempt, checkpoint = [], 0, None
    else:  # the same run folder, its events, and attempt numbers that go on
        run, announce, checkpoint = continue_run(resume, world_size, echo)
        attempt = announce[0]["attempt"]
    starter = Starter(run.path, device, Rendezvous(), ChannelServer(new_token()), config, function, spawn_name, args)
    ranks, outputs = starter.start(world_size, attempt, checkpoint)
    run._supervise(ranks, outputs, starter.server, starter.rendezvous, hang_timeout, echo,
                   starter=starter, attempt=attempt, announce=announce)
    return run


class Starter:
    """Starts one attempt's ranks: at launch, and again for every restart or
    new layout (the collector calls it), always the same way."""

    def __init__(self, path: Path, device: str, rendezvous: "Rendezvous", server: ChannelServer,
                 config: RunConfig | None, function: Callable[..., Any] | str | None, spawn_name: str | None,
                 args: tuple):
        self.path, self.device, self.rendezvous, self.server = path, device, rendezvous, server
        self.config, self.function, self.spawn_name, self.args = config, function, spawn_name, args

    def start(self, world_size: int, attempt: int = 0, checkpoint: Path | None = None,
              config: RunConfig | None = None) -> tuple[list[RankState], dict[int, io.BufferedIOBase]]:
        """Start every rank of attempt ``attempt``, resuming from ``checkpoint``
        if given; ``config`` replaces the run's (a new layout)."""
        self.config = config or self.config
        if self.config is not None:
            self.config.save(self.path / "config.json")  # what a later resume of this folder runs
            argv = [sys.executable, "-m", "ddlkit.worker", str(self.path / "config.json")]
        else:
            argv = [sys.executable, "-m", "ddlkit.worker", "--function", self.spawn_name or ""]
        started = time.time()
        threads = (self.config.threads if self.config is not None else None) or \
            max(1, len(os.sched_getaffinity(0)) // world_size)
        ranks, outputs = [], {}
        kernel_fds = [self.server.fileno()]  # a forked worker must not hold the kernel's sockets open
        for rank in range(world_size):
            env = worker_env(rank, world_size, self.rendezvous.port, self.server, self.path, self.device, threads,
                             attempt)
            if checkpoint is not None:
                env["DDLKIT_RESUME"] = str(checkpoint)
            if self.config is not None or self.spawn_name is not None:
                if self.spawn_name is not None:
                    env["DDLKIT_ARGS"] = json.dumps(list(self.args))
                process, output = spawn_worker(argv, env)
            else:
                process, output = fork_worker(rank, env, self.function, self.args, self.path, threads, kernel_fds)
            kernel_fds.append(output.fileno())
            ranks.append(RankState(rank, process, progress_at=started))
            outputs[rank] = output
        return ranks, outputs


class Rendezvous:
    """The TCPStore every rank meets at, hosted by the kernel so that it outlives
    any rank. torch's store would listen on every interface; handing it a
    socket bound to 127.0.0.1 keeps it on this machine."""

    def __init__(self, host: str = "127.0.0.1", timeout_s: float = 300.0):
        sock = socket.create_server((host, 0))
        self.port: int = sock.getsockname()[1]
        self._store = TCPStore(host, self.port, None, True, timedelta(seconds=timeout_s),
                               wait_for_workers=False, master_listen_fd=sock.detach())

    def close(self) -> None:
        self._store = None  # the store owns the socket and closes it when destroyed


def worker_env(rank: int, world_size: int, store_port: int, server: ChannelServer, run_path: Path,
               device: str, threads: int, attempt: int = 0) -> dict[str, str]:
    """What a rank needs to join the group and the channel. With
    TORCHELASTIC_USE_AGENT_STORE every rank joins the kernel's store as a client
    under a prefix of its attempt, as ranks under torchrun do."""
    host, port = server.address
    env = {
        "RANK": str(rank), "LOCAL_RANK": str(rank), "GROUP_RANK": "0",
        "WORLD_SIZE": str(world_size), "LOCAL_WORLD_SIZE": str(world_size),
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(store_port),
        "TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_RESTART_COUNT": str(attempt),
        "DDLKIT_CHANNEL": f"{host}:{port}", "DDLKIT_TOKEN": server.token, "DDLKIT_RUN_DIR": str(run_path),
        "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1",
    }
    if device == "cpu":
        env["ACCELERATE_USE_CPU"] = "1"  # else accelerate makes N single-process runs on a CPU-only machine
    if sys.platform == "linux":  # keep gloo's and NCCL's own sockets on loopback too
        for name in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
            env[name] = os.environ.get(name, "lo")
    return env


def spawn_worker(argv: list[str], env: dict[str, str]) -> tuple[subprocess.Popen, io.BufferedIOBase]:
    """A fresh interpreter in its own session: it inherits no CUDA state and no
    signal from the kernel's process group."""
    process = subprocess.Popen(argv, env={**os.environ, **env}, stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    return process, process.stdout


def fork_worker(rank: int, env: dict[str, str], function: Callable[..., Any], args: tuple, run_path: Path,
                threads: int, kernel_fds: list[int]) -> tuple[ForkedProcess, io.BufferedIOBase]:
    """A fork of the kernel for a function defined in the notebook (it cannot
    be imported by a fresh interpreter). Called from the kernel's main thread:
    a forked child is tied to the thread that forked it."""
    from .worker import run_function, serve

    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child; it never returns
        try:
            os.setpgid(0, 0)  # also done by the parent below: whoever runs first, no window
            for fd in [*kernel_fds, read_fd]:
                os.close(fd)
            os.dup2(write_fd, 1)
            os.dup2(write_fd, 2)
            os.close(write_fd)
            # The kernel's sys.stdout talks to Jupyter; the worker's goes to its pipe.
            sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), line_buffering=True)
            sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True)
            os.environ.update(env)
            torch.set_num_threads(threads)  # OMP_NUM_THREADS is read once, by the kernel
            serve(rank, run_path, run_function(function, args, rank, run_path))
        finally:
            os._exit(1)
    try:
        os.setpgid(pid, pid)  # its own process group before launch() returns: an interrupt cannot reach it
    except ProcessLookupError:  # it already ended; supervision reports how
        pass
    os.close(write_fd)
    return ForkedProcess(pid), os.fdopen(read_fd, "rb", buffering=0)


def _spawnable_name(function: Callable[..., Any] | str, args: tuple, device: str) -> str | None:
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


def _check_json_args(args: tuple) -> None:
    try:
        json.dumps(list(args))
    except TypeError as exc:
        raise TypeError(f"arguments for a spawned function must be JSON values (numbers, strings, lists, dicts): {exc}") from None
