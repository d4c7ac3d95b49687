"""``ddlkit slurm``: an sbatch script that runs an experiment on a Slurm cluster.

One task per node (``srun``) starts one ``torchrun`` agent, which starts the
node's ranks; the agents meet at a c10d rendezvous on the job's first node.
``--rdzv-id ddlkit-$SLURM_JOB_ID`` names the run folder, so it is known before
the job starts: ``runs/ddlkit-<job id>/`` under the config's ``run_dir``, which
must be on storage every node shares (the ranks of all nodes write their
events there; ``ddlkit.follow`` reads them from a notebook on a login node).

>>> cfg = RunConfig(strategy="data", world_size=16, run_dir="/shared/runs")
>>> script = render(cfg, Path("/shared/exp.yaml"), SlurmJob(nodes=2, gpus_per_node=8))
>>> "#SBATCH --nodes=2" in script and "--nproc-per-node=8" in script
True
>>> render(cfg, Path("/shared/exp.yaml"), SlurmJob(nodes=4, gpus_per_node=8))  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
ValueError: the config's world_size is 16, but 4 nodes x 8 processes start 32 ranks: set world_size: 32 ...
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import RunConfig
from .files import make_dir
from .runid import check_folder_name

RDZV_PORT = 29500
TIME = re.compile(r"(\d+-)?\d{1,2}(:\d{2}){0,2}")  # Slurm's D-HH:MM:SS and shorter forms


@dataclass
class SlurmJob:
    """What the sbatch script asks of Slurm."""

    nodes: int
    gpus_per_node: int = 0
    procs_per_node: int | None = None  # ranks per node: the GPUs, or this many CPU processes
    partition: str | None = None
    time: str | None = None
    max_restarts: int = 0
    job_name: str = "ddlkit"
    port: int = RDZV_PORT  # the rendezvous's, on the first node

    @property
    def nproc(self) -> int:
        return self.procs_per_node or self.gpus_per_node or 1

    def check(self, cfg: RunConfig) -> None:
        """One ValueError for anything Slurm or the experiment would refuse later."""
        if self.nodes < 1 or self.gpus_per_node < 0 or (self.procs_per_node is not None and self.procs_per_node < 1):
            raise ValueError("--nodes and --procs-per-node must be at least 1, --gpus-per-node at least 0")
        if not 1024 <= self.port <= 65535:
            raise ValueError(f"--port {self.port} is not a port a user may bind: give 1024..65535")
        if self.max_restarts < 0:
            raise ValueError(f"--max-restarts must be 0 or more, not {self.max_restarts}")
        if self.time is not None and TIME.fullmatch(self.time) is None:
            raise ValueError(f"--time {self.time!r} is not a Slurm time limit: give MM, HH:MM:SS or D-HH:MM:SS")
        for text, what in ((self.partition, "--partition"), (self.job_name, "--job-name")):
            if text is not None:
                check_folder_name(text, what)
        ranks = self.nodes * self.nproc
        if cfg.world_size != ranks:
            raise ValueError(
                f"the config's world_size is {cfg.world_size}, but {self.nodes} nodes x {self.nproc} processes "
                f"start {ranks} ranks: set world_size: {ranks} in the config, or change --nodes / "
                "--gpus-per-node / --procs-per-node"
            )


def render(cfg: RunConfig, config_path: Path, job: SlurmJob, python: str = sys.executable) -> str:
    """The sbatch script for ``cfg`` (saved at ``config_path``) as ``job``."""
    job.check(cfg)
    runs = Path(cfg.run_dir).absolute()
    directives = [
        f"--job-name={job.job_name}",
        f"--nodes={job.nodes}",
        "--ntasks-per-node=1",  # one torchrun agent per node; it starts the node's ranks
        f"--chdir={Path.cwd()}",  # the config's relative paths (run_dir) mean what they mean here
        f"--output={runs}/slurm-%j.out",
    ]
    directives += [f"--gpus-per-node={job.gpus_per_node}"] if job.gpus_per_node else []
    directives += [f"--partition={job.partition}"] if job.partition else []
    directives += [f"--time={job.time}"] if job.time else []
    torchrun = [
        f"--nnodes={job.nodes}",
        f"--nproc-per-node={job.nproc}",
        "--rdzv-backend=c10d",
        f'--rdzv-endpoint="$head_node:{job.port}"',
        '--rdzv-id="ddlkit-$SLURM_JOB_ID"',
        f"--max-restarts={job.max_restarts}",
    ]
    lines = [
        "#!/bin/bash",
        *(f"#SBATCH {d}" for d in directives),
        "# Written by `ddlkit slurm`. Submit: sbatch <this file>",
        "set -euo pipefail",
        f"cd {shlex.quote(str(Path.cwd()))}  # as --chdir: also when run by hand",
        "",
        "# The rendezvous: torchrun's c10d store on the job's first node.",
        'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        f"# Every rank writes to {runs}/ddlkit-$SLURM_JOB_ID/ (shared storage):",
        f"#   ddlkit.follow('{runs}/ddlkit-<job id>') in a notebook draws and steers it live.",
        f"export OMP_NUM_THREADS=${{OMP_NUM_THREADS:-{1 if not job.gpus_per_node else 4}}}",
        f"srun --kill-on-bad-exit=1 {shlex.quote(python)} -m torch.distributed.run \\",
        *(f"    {arg} \\" for arg in torchrun),
        f"    -m ddlkit.worker {shlex.quote(str(config_path.absolute()))}",
        "",
    ]
    return "\n".join(lines)


def add_parser(commands: Any) -> None:
    """The ``slurm`` subcommand on ``commands`` (argparse's subparsers)."""
    cmd = commands.add_parser("slurm", help="write an sbatch script that runs an experiment on a Slurm cluster")
    cmd.add_argument("config", help="experiment.yaml (world_size = nodes x processes per node)")
    cmd.add_argument("--nodes", type=int, required=True)
    cmd.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node; one rank each")
    cmd.add_argument("--procs-per-node", type=int, default=None, help="ranks per node (default: the GPUs, or 1)")
    cmd.add_argument("--partition", default=None)
    cmd.add_argument("--time", default=None, help="Slurm time limit, e.g. 01:00:00")
    cmd.add_argument("--max-restarts", type=int, default=0, help="torchrun restarts every rank after a failure")
    cmd.add_argument("--port", type=int, default=RDZV_PORT, help="the rendezvous port on the first node")
    cmd.add_argument("--output", default=None, help="the script's path (default: <config>.sbatch)")
    cmd.add_argument("--dry-run", action="store_true", help="print the script instead of writing it")


def command(opts: argparse.Namespace) -> int:
    """``ddlkit slurm``: write (or print) the script and say how to submit it."""
    config_path = Path(opts.config)
    cfg = RunConfig.load(config_path)
    job = SlurmJob(
        opts.nodes,
        opts.gpus_per_node,
        opts.procs_per_node,
        opts.partition,
        opts.time,
        opts.max_restarts,
        port=opts.port,
    )
    script = render(cfg, config_path, job)
    # This machine's limits (ranks per core) say nothing of the cluster's nodes: check one node's share of ranks.
    cfg.replace(world_size=job.nproc).validate()
    if opts.dry_run:
        print(script, end="")
        return 0
    out = Path(opts.output) if opts.output else config_path.with_suffix(".sbatch")
    out.write_text(script)
    make_dir(Path(cfg.run_dir).absolute())  # sbatch writes its output file there
    print(f"wrote {out}\nsubmit it with:  sbatch {out}")
    print(f"follow it with:  ddlkit.follow('{Path(cfg.run_dir).absolute()}/ddlkit-<job id>')")
    return 0
