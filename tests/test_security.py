"""No other local user can read or steer a run (issue 10, defects 7-10; 6 is in
test_hogwild.py). The other user is a forked child of the test running as
uid 65534 (``tests/strangers.py``)."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest

import ddlkit
from ddlkit import RunConfig, channel

from .conftest import port_is_free
from .strangers import as_stranger, channel_probe, needs_root, store_probe, whoami

MODE_VARIABLE = "DDLKIT_RUN_MODE"  # ddlkit.files.MODE_VARIABLE, spelled out as a user would


def _slow(seconds):
    time.sleep(seconds)


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


# ---- 7 and 8: the rendezvous store and the channel ---------------------------------
def test_another_user_can_neither_use_the_store_nor_reach_the_channel(runs_dir):
    from ddlkit.kernel import store

    needs_root()
    assert as_stranger(whoami) == 65534
    store.make_the_next()  # as after any run: the launch takes a rendezvous made ahead of time
    made_ahead = store._made_ahead[0].port
    run = ddlkit.launch(_slow, 6, num_processes=2, run_dir=runs_dir, echo=False)
    assert run.ports[0] == made_ahead
    channel_port = run.ports[1]  # after the store's (the ranks' MASTER_PORT)
    before = _rss_bytes()
    # Every port of the run, with the store's protocol: write 8 keys of 4 MiB, count the keys.
    answers = {port: as_stranger(store_probe, port, 8, 4) for port in run.ports}
    grown = _rss_bytes() - before
    assert not [a for a in answers.values() if a.startswith("answered")], answers
    assert grown < 16 << 20, f"the kernel grew by {grown >> 20} MiB while a stranger wrote to it"
    # The store's own port is listed in /proc/net/tcp, but the kernel drops a stranger's connection attempt.
    for port in run.ports[2:]:
        assert answers[port] == "no connection (TimeoutError)", answers
    # The channel closes on a stranger before saying anything (no challenge to work on).
    assert as_stranger(channel_probe, channel_port) == "closed"
    # Meanwhile this user's ranks met at the same store and finished.
    assert run.wait(timeout=120).status == "done"


def test_this_users_clients_get_through_the_relay(runs_dir):
    """torch's own client, in another process of this user, reads and writes the
    kernel's store through the relay (the ranks' path, also under env://)."""
    from ddlkit.kernel.store import Rendezvous

    rendezvous = Rendezvous()
    client = (
        "import torch.distributed as dist, datetime, json\n"
        f"s = dist.TCPStore('127.0.0.1', {rendezvous.port}, None, False, datetime.timedelta(seconds=20))\n"
        "s.set('a', 'x' * 3000000)\n"
        "p = dist.PrefixStore('/attempt_0', s)\n"
        "p.set('b', '2')\n"
        "print(json.dumps([len(s.get('a')), p.get('b').decode(), s.add('n', 5), sorted(s.list_keys())]))\n"
    )
    try:
        done = subprocess.run([sys.executable, "-c", client], capture_output=True, text=True, timeout=120)
    finally:
        rendezvous.close()
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout) == [3000000, "2", 5, ["/attempt_0/b", "a", "n"]]
    assert rendezvous.relay is not None and rendezvous.relay.refused == 0


def _sockets_held(of: list[str]) -> None:
    """In a rank: how many of the kernel's sockets ``of`` it holds."""
    held = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            held.add(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:  # the listing's own descriptor, closed by now
            pass
    ddlkit.log(step=0, held=len(held & set(of)))


def test_the_next_runs_rendezvous_is_made_when_a_run_ends_and_no_forked_rank_holds_any(runs_dir):
    """Making a rendezvous is 2-3 ms of a launch: the next run's is made when a run's closes, and
    taken by the next launch. A rank forked from the kernel closes every rendezvous the kernel holds
    (its run's, another live run's, the one made ahead), not only its own run's."""
    from ddlkit.kernel import store

    first = ddlkit.launch(_returns, 1, num_processes=2, run_dir=runs_dir, echo=False).wait(timeout=60)
    assert first.status == "done"
    made = list(store._made_ahead)
    assert len(made) == 1 and made[0].port not in first.ports and made[0].relay is not None
    store.make_the_next()
    assert store._made_ahead == made  # at most one waits
    other = store.Rendezvous()  # as another live run's
    try:
        sockets = [os.readlink(f"/proc/self/fd/{fd}") for fd in [*made[0].fds(), *other.fds()]]
        assert all(s.startswith("socket:") for s in sockets)
        assert len(set(sockets)) == 2 * 6  # each: the relay's 3, the store's listening one, its client's 2
        assert len(sockets) == 2 * 7  # the store's listening socket twice: torch's descriptor and the seal's
        run = ddlkit.launch(_sockets_held, sockets, num_processes=2, run_dir=runs_dir, echo=False, start="auto")
        assert run.ports[0] == made[0].port  # it took the one made ahead
        assert run.wait(timeout=60).status == "done", run.error
    finally:
        other.close()
    assert list(run.metrics["held"]) == [0, 0]
    assert [port_is_free(port) for port in run.ports] == [True] * len(run.ports)


def _silent(port: int, count: int) -> list[tuple[float, socket.socket]]:
    """Connections that never answer the challenge."""
    return [(time.monotonic(), socket.create_connection(("127.0.0.1", port))) for _ in range(count)]


def _closed_on(sock: socket.socket) -> bool:
    """Did the kernel close this silent connection (its challenge, then the end)?"""
    sock.settimeout(0.5)
    try:
        return len(sock.recv(64)) == 32 and sock.recv(1) == b""
    except OSError:  # still open: the read timed out
        return False


def _rate_and_stop(cfg: RunConfig, silent_per_batch: int) -> tuple[float, float, list[bool]]:
    """Steps per second over a 3 s window and how long stop() takes, with
    ``silent_per_batch`` silent connections opened at launch and mid-run."""
    run = ddlkit.launch(cfg, echo=False)
    first = _silent(run.ports[1], silent_per_batch)  # before any rank has connected
    deadline = time.monotonic() + 90
    while len(run.metrics) < 20 and time.monotonic() < deadline and run.status in ("starting", "running"):
        time.sleep(0.05)
    assert run.status == "running" and len(run.metrics) >= 20, f"with silent peers the run is {run.status}"
    second = _silent(run.ports[1], silent_per_batch)
    start_rows, started = len(run.metrics), time.monotonic()
    time.sleep(3.0)
    rate = (len(run.metrics) - start_rows) / (time.monotonic() - started)
    if first:  # past the first batch's deadline, the run still going
        time.sleep(max(0.0, first[-1][0] + channel.HANDSHAKE_TIMEOUT_S + 1 - time.monotonic()))
    closed = [_closed_on(sock) for _, sock in first]
    assert run.status == "running"
    began = time.monotonic()
    run.stop()
    stop_s = time.monotonic() - began
    for _, sock in first + second:
        sock.close()
    assert run.status == "stopped"
    return rate, stop_s, closed


def test_silent_connections_delay_no_rank(runs_dir):
    """A peer that connects to the channel and says nothing is handshaken off
    the supervisor's thread with a deadline: the ranks' events flow as fast as
    in a run without such peers, stop() is as quick, and each silent peer is
    closed once its deadline passes."""
    cfg = RunConfig(steps=10**6, world_size=2, batch_size=8, hidden=16, run_dir=runs_dir, device="cpu")
    clean_rate, clean_stop, _ = _rate_and_stop(cfg, 0)
    rate, stop_s, closed = _rate_and_stop(cfg, 24)
    assert clean_rate > 10
    # A wide margin: on 2 cores shared with other test runs (load ~12) the ratio
    # measured 0.59 and 1.37 in two pairs. On main the run failed outright.
    assert rate > 0.3 * clean_rate, (rate, clean_rate)
    assert stop_s < clean_stop + 1.0, (stop_s, clean_stop)
    assert len(closed) == 24 and all(closed), closed


# ---- 9: a run id from outside is a name, never a path ------------------------------
def _worker(cfg_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC", "DDLKIT", "MASTER_"))}
    return subprocess.run(
        [sys.executable, "-m", "ddlkit.worker", str(cfg_path)],
        env={**clean, "RANK": "0", "WORLD_SIZE": "1", **env},
        cwd=cfg_path.parent,
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_a_run_id_planted_in_the_agents_store_is_refused(tmp_path):
    """Under torchrun the ranks agree on a folder through the agent's store, which
    any local user can write to: a value that is not a ddlkit run id ends the
    rank with a clear error and nothing is written where it points."""
    from torch.distributed import TCPStore

    RunConfig(world_size=1, steps=3, batch_size=8, hidden=8, device="cpu").save(tmp_path / "exp.yaml")
    agent = TCPStore("127.0.0.1", 0, None, True, timedelta(seconds=30), wait_for_workers=False)
    agent.set("ddlkit/run_id", "../planted")  # what another user put there first
    env = {"TORCHELASTIC_USE_AGENT_STORE": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(agent.port)}
    done = _worker(tmp_path / "exp.yaml", env)
    assert done.returncode != 0
    assert "'../planted'" in done.stderr and "will not be used as a folder name" in done.stderr
    assert not (tmp_path / "planted").exists() and not (tmp_path / "runs").exists()
    # A launcher's own id must be a plain name too.
    done = _worker(tmp_path / "exp.yaml", {"TORCHELASTIC_RUN_ID": "../../elsewhere"})
    assert done.returncode != 0 and "TORCHELASTIC_RUN_ID" in done.stderr
    assert not (tmp_path.parent / "elsewhere").exists()
    # A folder another user made in advance under that name is not written into.
    needs_root()
    trap = tmp_path / "runs" / "job-7"
    trap.mkdir(parents=True)
    os.chown(trap, 65534, 65534)
    done = _worker(tmp_path / "exp.yaml", {"TORCHELASTIC_RUN_ID": "job-7"})
    assert done.returncode != 0 and "is not a folder of this user's" in done.stderr
    assert list(trap.iterdir()) == []


def test_a_rank_started_by_another_launcher_writes_privately(tmp_path):
    RunConfig(world_size=1, steps=3, batch_size=8, hidden=8, device="cpu").save(tmp_path / "exp.yaml")
    done = _worker(tmp_path / "exp.yaml", {"TORCHELASTIC_RUN_ID": "job-42"})
    assert done.returncode == 0, done.stderr[-2000:]
    folder = tmp_path / "runs" / "job-42"
    assert {p.name for p in folder.iterdir()} >= {"config.json", "events-rank0.jsonl", "final_state.pt"}
    assert _modes(folder) == ({0o700}, {0o600})


# ---- 10: private run folders, wider only when asked --------------------------------
def _modes(folder: Path) -> tuple[set[int], set[int]]:
    """The permission bits of the folder and every folder under it, and of every file."""
    paths = [folder, *folder.rglob("*")]
    folders = {stat.S_IMODE(p.stat().st_mode) for p in paths if p.is_dir()}
    files = {stat.S_IMODE(p.stat().st_mode) for p in paths if p.is_file()}
    return folders, files


def _returns(value):
    ddlkit.log(step=0, loss=1.0)
    return {"value": value}


def _run_everything(runs_dir: str) -> list[Path]:
    """A run that writes every kind of file: checkpoints, logs, events, final
    weights, config, summary and a report; and a function run that returns values."""
    cfg = RunConfig(steps=6, world_size=2, batch_size=8, hidden=8, checkpoint_every=2, run_dir=runs_dir)
    run = ddlkit.launch(cfg, echo=False).wait(timeout=120)
    ddlkit.report(run, run.path / "report.html")
    function_run = ddlkit.launch(_returns, 7, num_processes=2, run_dir=runs_dir, echo=False).wait(timeout=120)
    return [run.path, function_run.path]


def test_run_folders_and_files_are_private(runs_dir):
    old = os.umask(0o022)  # the usual umask: without care, folders 0755 and files 0644
    try:
        folders = _run_everything(runs_dir)
    finally:
        os.umask(old)
    config_run, function_run = folders
    names = {p.relative_to(config_run).as_posix() for p in config_run.rglob("*")}
    assert {"config.json", "run.json", "summary.json", "events.jsonl", "rank0.log", "rank1.log"} <= names
    assert {"final_state.pt", "report.html"} <= names
    assert [n for n in names if n.startswith("checkpoints/step-") and n.endswith("/manifest.json")]
    assert {"return-rank0.pt", "return-rank1.pt"} <= {p.name for p in function_run.iterdir()}
    for folder in folders:
        assert _modes(folder) == ({0o700}, {0o600}), folder
    assert stat.S_IMODE(Path(runs_dir).stat().st_mode) == 0o700  # the runs folder ddlkit made


def test_wider_modes_only_when_asked(runs_dir, monkeypatch):
    monkeypatch.setenv(MODE_VARIABLE, "750")
    for folder in _run_everything(runs_dir):
        assert _modes(folder) == ({0o750}, {0o640}), folder


@pytest.mark.parametrize("value", ["777", "0644", "770", "abc", "7000", "-700"])
def test_a_bad_mode_is_refused_before_anything_is_written(runs_dir, monkeypatch, value):
    monkeypatch.setenv(MODE_VARIABLE, value)
    with pytest.raises(ValueError, match=f"{MODE_VARIABLE}=.* is invalid: .*700 .*750 .*755"):
        ddlkit.launch(RunConfig(run_dir=runs_dir), echo=False)
    assert not Path(runs_dir).exists()


@pytest.mark.skipif(sys.platform != "linux", reason="netlink and /proc/net/tcp are Linux's")
def test_the_socket_table_over_netlink_is_the_one_in_proc_and_proc_is_the_fallback(monkeypatch):
    """Who owns a connection is read over netlink (~0.5 ms, against ~7 ms for /proc/net/tcp,
    three times on a launch's critical path); both must give the same sockets, owners and inodes."""
    from ddlkit import peers, sockdiag

    with socket.create_server(("127.0.0.1", 0)) as server, socket.socket(socket.AF_INET6) as client:
        client.connect(("::ffff:127.0.0.1", server.getsockname()[1]))  # an IPv6 socket, as torch's client may use
        accepted, _ = server.accept()
        with accepted:
            ports = {server.getsockname()[1], client.getsockname()[1]}

            def ours(table):
                return sorted(s for s in table if s.local[1] in ports and s.state != "06")

            over_netlink, in_proc = ours(peers.tcp_sockets()), ours(peers._proc_tcp_sockets())
            assert over_netlink == in_proc and len(in_proc) == 3  # listening, and both ends of the connection
            assert {s.uid for s in in_proc} == {os.geteuid()} and all(s.inode for s in in_proc)
            assert {s.local[0] for s in in_proc} == {"127.0.0.1"}  # the IPv6 client's address, as IPv4
            assert peers.owner_uid(accepted) == os.geteuid()
            # the same owner found by the connection's addresses alone (no dump), the IPv6 client's included
            assert sockdiag.owner(accepted.getpeername(), accepted.getsockname()) == (1, os.geteuid())  # established
            assert sockdiag.owner(("127.0.0.1", 1), ("127.0.0.1", 2)) is None

            def no_netlink():
                raise OSError("no inet_diag")

            monkeypatch.setattr(sockdiag, "tcp_sockets", no_netlink)  # a kernel without sock_diag
            monkeypatch.setattr(sockdiag, "owner", lambda *ends: no_netlink())
            assert ours(peers.tcp_sockets()) == in_proc and peers.owner_uid(accepted) == os.geteuid()
