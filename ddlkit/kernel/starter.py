"""Starting one attempt's worker processes, always the same way: at launch,
and again for every restart or new layout.

Small pieces, each with one job: the environment each rank is given (the
rendezvous store it meets the others at, ``ddlkit.kernel.store``, and the
channel it reports on), and starting one worker process: forked from the
warm starter (``ddlkit.kernel.forkserver``) for built-in experiments and
functions given by name or cloudpickled (``ddlkit.kernel.pickled``), forked
from the kernel for a function defined in a notebook while that is safe, or
spawned as a fresh interpreter (``start="spawn"``, or where no starter works).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch  # here rather than in launch(): the first import costs a second

from ..channel import ChannelServer
from ..config import RunConfig
from ..files import set_file_mode
from . import forkserver, store
from .ranks import ForkedProcess, RankState, WorkerProcess, kill_group, wait_gone
from .store import Rendezvous


class Starter:
    """Starts one attempt's ranks: at launch, and again for every restart or
    new layout (the collector calls it), always the same way.

    ``argv`` is what the ranks run (as ``python -m ddlkit.worker ARGV``); None
    forks the kernel to run ``function`` (a notebook function, where that is
    safe). ``warm``: ranks come from the warm starter (``ddlkit.kernel.forkserver``),
    else fresh interpreters are spawned; where the starter cannot work, they are spawned too."""

    def __init__(
        self,
        path: Path,
        device: str,
        rendezvous: Rendezvous,
        server: ChannelServer,
        config: RunConfig | None,
        function: Callable[..., Any] | None,
        args: tuple[Any, ...],
        argv: list[str] | None,
        warm: bool,
    ):
        self.path, self.device, self.rendezvous, self.server = path, device, rendezvous, server
        self.config, self.function, self.args, self.argv, self.warm = config, function, args, argv, warm
        self.started_by = ""  # how the last attempt's ranks were started: "warm", "spawn" or "fork"

    def start(
        self, world_size: int, attempt: int = 0, checkpoint: Path | None = None, config: RunConfig | None = None
    ) -> tuple[list[RankState], dict[int, Any]]:
        """Start every rank of attempt ``attempt``, resuming from ``checkpoint``
        if given; ``config`` replaces the run's (a new layout). If one cannot be
        started, those already started are ended before the error is raised."""
        self.config = config or self.config
        if self.config is not None:
            self.config.save(self.path / "config.json")  # what a later resume of this folder runs
            set_file_mode(self.path / "config.json")
        started = time.time()
        threads = (self.config.threads if self.config is not None else None) or max(
            1, len(os.sched_getaffinity(0)) // world_size
        )
        ranks: list[RankState] = []
        outputs: dict[int, Any] = {}
        envs = [self._env(rank, world_size, threads, attempt, checkpoint) for rank in range(world_size)]
        try:
            warmed = self._start_warm(envs, threads)  # all at once; None: forked or spawned one by one
            kernel_fds = [] if warmed else self._kernel_fds()  # a forked worker must not hold them open
            for rank, env in enumerate(envs):
                process, output = warmed[rank] if warmed else self._start_one(rank, env, threads, kernel_fds)
                kernel_fds.append(output.fileno())
                ranks.append(RankState(rank, process, progress_at=started))
                outputs[rank] = output
        except BaseException:  # e.g. no more processes allowed: none of this attempt may be left
            for state in ranks:
                kill_group(state.process.pid)
                wait_gone(state.process)
                outputs[state.rank].close()
            raise
        return ranks, outputs

    def _env(self, rank: int, world_size: int, threads: int, attempt: int, checkpoint: Path | None) -> dict[str, str]:
        env = worker_env(rank, world_size, self.rendezvous.port, self.server, self.path, self.device, threads, attempt)
        if checkpoint is not None:
            env["DDLKIT_RESUME"] = str(checkpoint)
        if self.argv is not None and self.argv[0] == "--function":
            env["DDLKIT_ARGS"] = json.dumps(list(self.args))
        return env

    def _kernel_fds(self) -> list[int]:
        """What the kernel holds that a rank forked from it closes: the channel's listening socket, every
        rendezvous' sockets (this run's, other runs', the one made ahead) and the warm starter's socket."""
        fds = [*self.server.fds(), *store.kernel_fds()]
        if (warm := forkserver.current()) is not None:
            fds.append(warm.fileno())
        return fds

    def _start_warm(self, envs: list[dict[str, str]], threads: int) -> list[tuple[WorkerProcess, Any]] | None:
        """Every rank from the warm starter, or None where it is not used or cannot work."""
        if self.argv is None or not self.warm:
            return None
        try:
            started = forkserver.warm_starter().start(self.argv, envs, threads)
        except forkserver.StarterUnavailable:  # spawned instead, as before the starter existed
            self.warm = False
            return None
        self.started_by = "warm"
        return list(started)

    def _start_one(
        self, rank: int, env: dict[str, str], threads: int, kernel_fds: list[int]
    ) -> tuple[WorkerProcess, Any]:
        """One rank forked from the kernel (a notebook function), or spawned."""
        if self.argv is None:
            assert callable(self.function)  # only a function object is forked
            self.started_by = "fork"
            return fork_worker(rank, env, self.function, self.args, self.path, threads, kernel_fds)
        self.started_by = "spawn"
        return spawn_worker([sys.executable, "-m", "ddlkit.worker", *self.argv], env)

    def ready(self) -> bool:
        """Whether :meth:`start` can start the ranks at once: False while the warm
        starter it will use still preloads (started now if there was none)."""
        if self.argv is None or not self.warm:
            return True
        try:
            return forkserver.warm_starter(wait=False).is_ready()
        except forkserver.StarterUnavailable:
            return True  # spawned instead

    def close(self) -> None:
        """The store and the channel's listening socket go with the run; the next run's store is made."""
        self.server.close()
        self.rendezvous.close()
        store.make_the_next()


def worker_env(
    rank: int,
    world_size: int,
    store_port: int,
    server: ChannelServer,
    run_path: Path,
    device: str,
    threads: int,
    attempt: int = 0,
) -> dict[str, str]:
    """What a rank needs to join the group and the channel. With
    TORCHELASTIC_USE_AGENT_STORE every rank joins the kernel's store as a client
    under a prefix of its attempt, as ranks under torchrun do."""
    host, port = server.address
    env = {
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "GROUP_RANK": "0",
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(store_port),
        "TORCHELASTIC_USE_AGENT_STORE": "True",
        "TORCHELASTIC_RESTART_COUNT": str(attempt),
        "DDLKIT_CHANNEL": f"{host}:{port}",
        "DDLKIT_TOKEN": server.token,
        "DDLKIT_RUN_DIR": str(run_path),
        "OMP_NUM_THREADS": str(threads),
        "PYTHONUNBUFFERED": "1",
    }
    if device == "cpu":
        env["ACCELERATE_USE_CPU"] = "1"  # else accelerate makes N single-process runs on a CPU-only machine
    if sys.platform == "linux":  # keep gloo's and NCCL's own sockets on loopback too
        for name in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
            env[name] = os.environ.get(name, "lo")
    return env


def spawn_worker(argv: list[str], env: dict[str, str]) -> tuple[WorkerProcess, Any]:
    """A fresh interpreter in its own session: it inherits no CUDA state and no
    signal from the kernel's process group."""
    process = subprocess.Popen(
        argv,
        env={**os.environ, **env},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return process, process.stdout


def fork_worker(
    rank: int,
    env: dict[str, str],
    function: Callable[..., Any],
    args: tuple[Any, ...],
    run_path: Path,
    threads: int,
    kernel_fds: list[int],
) -> tuple[WorkerProcess, Any]:
    """A fork of the kernel for a function defined in the notebook (it cannot
    be imported by a fresh interpreter). Called from the kernel's main thread:
    a forked child is tied to the thread that forked it."""
    from ..rank.entry import run_function, serve  # the rank's side, run in the forked child

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
