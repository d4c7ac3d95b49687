"""Two "nodes" on one machine for the multi-node tests: torchrun agents started
here (each its own session), optionally inside network namespaces joined by a
veth pair, and proof that nothing of them is left afterwards.

Every process an agent starts inherits ``DDLKIT_TEST_TAG`` (torchrun passes its
environment on to the ranks it starts, each in a new session of its own, so a
process group is not enough to find them): after a test, no process on the
machine may carry the tag, and the rendezvous port must be free.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from tests.conftest import port_is_free

TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))


def tagged(tag: str) -> list[int]:
    """Pids of the processes whose environment carries ``DDLKIT_TEST_TAG=tag``."""
    needle = f"DDLKIT_TEST_TAG={tag}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:  # gone meanwhile, or a zombie
                continue
    return found


class Agents:
    """torchrun agents of one test: start, wait, and clean up on every exit path."""

    def __init__(self, folder: Path, port: int):
        self.folder = folder
        self.port = port
        self.tag = uuid.uuid4().hex
        self.procs: list[subprocess.Popen] = []

    def start(
        self,
        config: Path,
        nnodes: int,
        nproc: int,
        endpoint: str = "127.0.0.1",
        netns: str | None = None,
        env: dict[str, str] | None = None,
        extra: Sequence[str] = (),
        launcher: str = "torchrun",
    ) -> subprocess.Popen:
        """One agent: ``torchrun --nnodes N --nproc-per-node P --rdzv-backend c10d ... -m ddlkit.worker config``,
        or the same node under ``accelerate launch``'s multi-node flags."""
        node = len(self.procs) % nnodes
        command = [
            TORCHRUN,
            f"--nnodes={nnodes}",
            f"--node-rank={node}",
            f"--nproc-per-node={nproc}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={endpoint}:{self.port}",
            *extra,
            "-m",
            "ddlkit.worker",
            str(config),
        ]
        if launcher == "accelerate":  # its multi-node flags; --num_processes counts every node's
            command = [ACCELERATE, "launch", "--multi_gpu", f"--num_machines={nnodes}", f"--machine_rank={node}"]
            command += [f"--num_processes={nnodes * nproc}", f"--main_process_ip={endpoint}"]
            command += [f"--main_process_port={self.port}", *extra, "-m", "ddlkit.worker", str(config)]
            env = {"ACCELERATE_USE_CPU": "1", **(env or {})}
        if netns is not None:
            command = ["ip", "netns", "exec", netns, *command]
        log = open(self.folder / f"agent{len(self.procs)}.log", "wb")
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC", "DDLKIT_", "MASTER_"))}
        full_env = {**clean, "OMP_NUM_THREADS": "1", "DDLKIT_TEST_TAG": self.tag, **(env or {})}
        proc = subprocess.Popen(
            command, cwd=config.parent, env=full_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        self.procs.append(proc)
        return proc

    def wait(self, timeout: float) -> list[int]:
        """Every agent's exit code; a TimeoutError (with the logs' tails) past ``timeout``."""
        deadline = time.monotonic() + timeout
        codes = []
        for proc in self.procs:
            try:
                codes.append(proc.wait(max(deadline - time.monotonic(), 0.1)))
            except subprocess.TimeoutExpired:
                raise TimeoutError(f"torchrun agents still running after {timeout} s\n{self.logs()}") from None
        return codes

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.folder.glob("agent*.log")))

    def kill(self) -> None:
        """SIGKILL every agent's group and every tagged process (ranks lead sessions of their own)."""
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for pid in tagged(self.tag):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for proc in self.procs:
            proc.wait(10)

    def assert_gone(self, timeout: float = 10.0) -> None:
        """No process of these agents left, and the rendezvous port free."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and (tagged(self.tag) or not port_is_free(self.port)):
            time.sleep(0.1)
        assert tagged(self.tag) == [], f"processes of the torchrun agents left: {tagged(self.tag)}"
        assert port_is_free(self.port), f"rendezvous port {self.port} still in use"


def ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


class Namespaces:
    """Two network namespaces joined by a veth pair, 10.<x>.0.1 and .2: two
    "nodes" with their own interfaces and addresses, so no rank of one can
    reach the other through loopback."""

    def __init__(self) -> None:
        self.tag = "dk" + uuid.uuid4().hex[:6]
        subnet = 16 + int(self.tag[2:4], 16) % 200
        self.names = [f"{self.tag}-a", f"{self.tag}-b"]
        self.veths = [f"{self.tag}-va", f"{self.tag}-vb"]
        self.addresses = [f"10.{subnet}.0.1", f"10.{subnet}.0.2"]

    def create(self) -> None:
        steps = [
            *(["netns", "add", name] for name in self.names),
            ["link", "add", self.veths[0], "type", "veth", "peer", "name", self.veths[1]],
        ]
        for name, veth, address in zip(self.names, self.veths, self.addresses, strict=True):
            steps += [
                ["link", "set", veth, "netns", name],
                ["-n", name, "addr", "add", f"{address}/24", "dev", veth],
                ["-n", name, "link", "set", veth, "up"],
                ["-n", name, "link", "set", "lo", "up"],
            ]
        for step in steps:
            done = ip(*step)
            assert done.returncode == 0, f"ip {' '.join(step)}: {done.stderr}"

    def delete(self) -> None:
        """Delete both namespaces (their veth ends go with them)."""
        for name in self.names:
            ip("netns", "del", name)

    def assert_gone(self) -> None:
        listed = ip("netns", "list").stdout
        assert not any(name in listed for name in self.names), listed
        assert self.tag not in ip("link", "show").stdout

    def bytes_sent(self, node: int) -> int:
        """Bytes that node's veth end has sent so far."""
        path = f"/sys/class/net/{self.veths[node]}/statistics/tx_bytes"
        done = subprocess.run(["ip", "netns", "exec", self.names[node], "cat", path], capture_output=True, text=True)
        return int(done.stdout)
