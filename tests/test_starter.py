"""The warm starter (ddlkit.kernel.forkserver, ddlkit.rank.forkserver) and the
cloudpickle path (ddlkit.kernel.pickled): ranks forked from a process that
never touched CUDA, each leading its own process group, gone after a stop, a
crash or the kernel's death; a notebook function and class that give the same
weights whether forked from the kernel or cloudpickled to the starter."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

import ddlkit
from ddlkit import RunConfig
from ddlkit.kernel import forkserver

from .conftest import children_of, running_in_process_group

REPO = Path(__file__).resolve().parent.parent


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_until(condition, timeout: float) -> float:
    """Seconds until ``condition()`` held; fails after ``timeout``."""
    started = time.time()
    while not condition():
        assert time.time() - started < timeout, f"not within {timeout} s"
        time.sleep(0.05)
    return time.time() - started


def whoami():
    ddlkit.log(
        step=0,
        pid=os.getpid(),
        parent=os.getppid(),
        group=os.getpgid(0),
        cuda=torch.cuda.is_initialized(),
        threads=torch.get_num_threads(),
    )


def test_a_spares_first_steps_stop_when_asked_and_leave_threads_and_random_state_as_they_were():
    """A spare trains each built-in model one step while it waits (its rank's first step is then
    3 ms, not 12), asking before each whether its request came; on one thread, and with torch's
    random state put back, so that a function that draws numbers unseeded in a rank gets what a
    fresh interpreter would."""
    from ddlkit.rank.prewarm import FIRST_STEPS, first_steps

    def stop_after(steps):
        asked = []

        def stop():
            asked.append(True)
            return len(asked) > steps

        return asked, stop

    threads, random_state = torch.get_num_threads(), torch.get_rng_state()
    asked, never = stop_after(1000)
    first_steps(stop=never)
    assert len(asked) == 3 * len(FIRST_STEPS)  # before each step: each model, with each optimizer
    asked, after_two = stop_after(2)
    first_steps(stop=after_two)
    assert len(asked) == 3  # two steps, then it stopped
    assert torch.get_num_threads() == threads
    assert torch.equal(torch.get_rng_state(), random_state)
    assert not torch.cuda.is_initialized()


def _no_such_interface(name: str) -> int:
    raise OSError(19, f"no such device: {name}")


@pytest.mark.skipif(sys.platform != "linux", reason="the spare's group warm-up runs on Linux (gloo on lo)")
def test_a_spares_group_warm_up_leaves_no_group_thread_socket_or_traffic_and_numbers_groups_afresh():
    """A spare also takes one DDP step in a group of its own (5 ms off a launch's first row). Its
    rank must then be what a fresh one is: no group, no gloo thread or socket left, nothing counted
    as the run's traffic, and the next group named as a fresh process names it (a warmed rank and
    one whose request came first must meet under the same store keys)."""
    from ddlkit.rank import prewarm
    from ddlkit.rank.emulated import NETWORK

    def own(kind):
        return sorted(os.listdir(f"/proc/self/{kind}"))

    random_state, threads, network = torch.get_rng_state(), torch.get_num_threads(), NETWORK.totals()
    tasks, fds, ifname = own("task"), own("fd"), os.environ.get("GLOO_SOCKET_IFNAME")
    wrapped = []

    class Counted(prewarm.DistributedDataParallel):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            wrapped.append(self.process_group.size())

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(prewarm, "DistributedDataParallel", Counted)
        prewarm.warm_up(stop=lambda: False)
        assert wrapped == [1]  # DDP over a group of one
        asked = []
        prewarm.warm_up(stop=lambda: asked.append(True) or len(asked) > 2)  # stopped: no group either
        assert len(asked) == 4 and wrapped == [1]  # two steps, the third refused, and asked again before the group
        patch.setattr(prewarm.socket, "if_nametoindex", _no_such_interface)
        prewarm.first_collectives()  # no `lo`: no group (gloo could not make its device), the spare still serves
        assert wrapped == [1]
    assert not torch.distributed.is_initialized()
    assert torch.distributed.distributed_c10d._world.group_count == 0
    assert own("task") == tasks and own("fd") == fds
    assert os.environ.get("GLOO_SOCKET_IFNAME") == ifname
    assert NETWORK.totals() == network
    assert torch.equal(torch.get_rng_state(), random_state) and torch.get_num_threads() == threads


def test_the_starter_never_touched_cuda_talks_privately_and_its_ranks_lead_their_groups(runs_dir):
    warm = forkserver.warm_starter()
    probe = warm.probe()
    assert probe["cuda_initialized"] is False
    assert probe["python_threads"] == 1  # nothing that could hold a lock across a fork
    assert probe["modules"] > 500  # torch, accelerate and the strategies are in already
    # Its sockets: none on the network, none with a name in the file system.
    sockets = {os.readlink(f"/proc/{warm.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{warm.pid}/fd")}
    inodes = {s[len("socket:[") : -1] for s in sockets if s.startswith("socket:[")}
    assert inodes, "its control socket"
    for table in ("tcp", "tcp6", "udp", "udp6"):
        rows = Path(f"/proc/net/{table}").read_text().splitlines()[1:]
        assert not inodes & {row.split()[9] for row in rows}, f"a {table} socket"
    unix = [row.split() for row in Path("/proc/net/unix").read_text().splitlines()[1:]]
    assert all(len(row) == 7 for row in unix if row[6] in inodes), "a unix socket with a path"

    run = ddlkit.launch(whoami, num_processes=2, run_dir=runs_dir, echo=False, start="warm").wait(timeout=60)
    rows = run.metrics
    assert set(rows["parent"]) == {warm.pid}
    assert (rows["group"] == rows["pid"]).all()  # each its own process group
    assert not rows["cuda"].any()
    assert set(rows["threads"]) == {max(1, len(os.sched_getaffinity(0)) // 2)}


def test_a_built_in_run_comes_from_the_starter_and_is_gone_within_10_s_of_a_stop(runs_dir):
    warm = forkserver.warm_starter()
    cfg = RunConfig(strategy="data", world_size=2, steps=100000, batch_size=8, run_dir=runs_dir)
    run = ddlkit.launch(cfg, echo=False)
    wait_until(lambda: run.steps_done > 0 or run.status not in ("starting", "running"), 60)
    assert run.status == "running"
    assert set(run.pids) <= set(children_of(warm.pid))
    run.stop(timeout=15)
    assert run.status == "stopped"
    wait_until(lambda: not any(running_in_process_group(pid) for pid in run.pids), 10)
    wait_until(lambda: not set(run.pids) & set(children_of(warm.pid)), 10)  # reaped by the starter


def crash_on_rank_1():
    ddlkit.log(step=0)
    if os.environ["RANK"] == "1":
        raise RuntimeError("rank 1 breaks")
    time.sleep(600)


def test_a_crashed_rank_from_the_starter_fails_the_run_and_every_rank_is_gone(runs_dir):
    run = ddlkit.launch(crash_on_rank_1, num_processes=2, run_dir=runs_dir, echo=False, start="warm")
    with pytest.raises(ddlkit.RunFailed, match="RuntimeError: rank 1 breaks"):
        run.wait(timeout=60)
    wait_until(lambda: not any(running_in_process_group(pid) for pid in run.pids), 10)


KERNEL_STAND_IN = """
import json, sys, time
import ddlkit

def sleepy():
    ddlkit.log(step=0)
    time.sleep(600)

run = ddlkit.launch(sleepy, num_processes=2, run_dir=sys.argv[1], echo=False, start="warm")
while len(run.metrics) < 2 and run.status in ("starting", "running"):  # both ranks in their function
    time.sleep(0.05)
starter = ddlkit.kernel.forkserver.current()
while len(starter.probe()["spares"]) < 2:  # forked again once the launch is over
    time.sleep(0.05)
print(json.dumps({"starter": starter.pid, "ranks": run.pids, "spares": starter.probe()["spares"]}), flush=True)
if sys.argv[2] == "sigkill":
    time.sleep(600)
"""


@pytest.mark.parametrize("how", ["exit", "sigkill"])
def test_the_starter_and_its_ranks_end_with_the_kernel(tmp_path, how):
    script = tmp_path / "kernel.py"
    script.write_text(KERNEL_STAND_IN)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    kernel = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "runs"), how], stdout=subprocess.PIPE, text=True, env=env
    )
    pids: dict = {}
    try:
        assert select.select([kernel.stdout], [], [], 60)[0], "the stand-in said nothing in 60 s"
        pids = json.loads(kernel.stdout.readline())
        assert len(pids["ranks"]) == 2 and len(pids["spares"]) == 2 and alive(pids["starter"])
        if how == "sigkill":
            kernel.send_signal(signal.SIGKILL)
        kernel.wait(timeout=30)
        wait_until(lambda: not alive(pids["starter"]), 10)
        wait_until(lambda: not any(running_in_process_group(pid) for pid in pids["ranks"] + pids["spares"]), 10)
    finally:  # nothing of this test may outlive it, also when it fails
        kernel.kill()
        kernel.wait()
        kernel.stdout.close()
        for pid in [pids.get("starter"), *pids.get("ranks", []), *pids.get("spares", [])]:
            if pid and alive(pid):
                os.kill(pid, signal.SIGKILL)


# A notebook, as the kernel sees it: code whose module is __main__, with a
# global, a closure and a class of its own (cloudpickle must send them by value).
NOTEBOOK = """
import torch
from accelerate import Accelerator

SCALE = 0.5

class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.layer(x) * SCALE

def make_train(lr):
    def train(steps):
        torch.manual_seed(0)
        accelerator = Accelerator()
        model = Net()
        optimizer = torch.optim.SGD(model.parameters(), lr=lr)
        model, optimizer = accelerator.prepare(model, optimizer)
        generator = torch.Generator().manual_seed(accelerator.process_index)
        for _ in range(steps):
            x = torch.randn(16, 8, generator=generator)
            loss = model(x).pow(2).mean()
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
        return accelerator.unwrap_model(model).state_dict()
    return train

train = make_train(0.1)
"""


def notebook() -> dict:
    namespace = {"__name__": "__main__"}
    exec(textwrap.dedent(NOTEBOOK), namespace)
    return namespace


def test_a_notebook_function_and_class_give_the_same_weights_cloudpickled_as_forked(runs_dir):
    train = notebook()["train"]
    assert train.__module__ == "__main__" and train.__closure__  # a notebook's, with a closure
    forked = ddlkit.launch(train, 5, num_processes=2, run_dir=runs_dir, echo=False).wait(timeout=90)
    pickled = ddlkit.launch(train, 5, num_processes=2, run_dir=runs_dir, echo=False, start="warm").wait(timeout=90)
    assert not (forked.path / "function.pkl").exists() and (pickled.path / "function.pkl").exists()
    weights = forked.result().returns
    assert set(weights) == {0, 1} == set(pickled.result().returns)
    for rank in (0, 1):
        for name, tensor in weights[rank].items():
            assert torch.equal(tensor, pickled.result().returns[rank][name]), name
    assert not torch.equal(weights[0]["layer.weight"], Net_initial_weight())  # it trained


def Net_initial_weight() -> torch.Tensor:
    torch.manual_seed(0)
    return notebook()["Net"]().layer.weight.detach()


def test_a_capture_that_cannot_travel_is_named_before_anything_starts(runs_dir):
    namespace = notebook()
    namespace["lock"] = threading.Lock()
    exec("def uses_a_lock():\n    with lock:\n        pass\n", namespace)
    with pytest.raises(ValueError, match=r"uses_a_lock uses 'lock' \(a lock\), which cannot be sent to the ranks"):
        ddlkit.launch(namespace["uses_a_lock"], run_dir=runs_dir, echo=False, start="warm")
    with socket.socket() as conn:

        def uses_a_socket():
            return conn.fileno()

        with pytest.raises(ValueError, match=r"uses 'conn' \(a socket.socket\)"):
            ddlkit.launch(uses_a_socket, run_dir=runs_dir, echo=False, start="warm")
    with pytest.raises(ValueError, match=r"argument 1 of whoami \(a lock\) cannot be sent"):
        ddlkit.launch(whoami, threading.Lock(), run_dir=runs_dir, echo=False, start="spawn")
    with pytest.raises(ValueError, match="start='fork' is invalid: give 'auto', 'warm' or 'spawn'"):
        ddlkit.launch(whoami, run_dir=runs_dir, echo=False, start="fork")
    assert not Path(runs_dir).exists()  # nothing was written, nothing started


def test_start_spawn_runs_a_cloudpickled_function_in_fresh_interpreters(runs_dir, monkeypatch):
    monkeypatch.setenv("DDLKIT_START", "spawn")  # the old path, kept for debugging
    run = ddlkit.launch(whoami, num_processes=2, run_dir=runs_dir, echo=False).wait(timeout=90)
    assert set(run.metrics["parent"]) == {os.getpid()}
    assert (run.path / "function.pkl").exists()


@pytest.mark.parametrize("start", ["warm", "spawn"])
def test_a_function_from_a_folder_the_kernel_put_on_sys_path_runs_cloudpickled(runs_dir, tmp_path, monkeypatch, start):
    """cloudpickle sends an importable module's function by name: the ranks
    import it through the kernel's sys.path (``python -m benchmarks`` failed so)."""
    (tmp_path / "kernel_only_module.py").write_text(
        "import ddlkit\n\ndef report(value):\n    ddlkit.log(step=0, value=value)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    from kernel_only_module import report  # type: ignore[import-not-found]

    run = ddlkit.launch(report, 7.0, num_processes=2, run_dir=runs_dir, echo=False, start=start).wait(timeout=90)
    assert (run.path / "function.pkl").exists() and list(run.metrics["value"]) == [7.0, 7.0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_after_cuda_init_in_the_kernel_a_notebook_function_and_a_config_still_run_on_the_gpu(runs_dir):
    torch.zeros(1, device="cuda")  # CUDA is initialised in this "kernel" now: forking it is unsafe
    assert torch.cuda.is_initialized()
    namespace = notebook()
    exec(
        "def on_gpu():\n    import ddlkit\n    ddlkit.log(step=0, total=float(torch.ones(4, device='cuda').sum()))\n",
        namespace,
    )
    run = ddlkit.launch(namespace["on_gpu"], num_processes=1, device="cuda", run_dir=runs_dir, echo=False)
    assert set(run.wait(timeout=120).metrics["total"]) == {4.0}
    assert (run.path / "function.pkl").exists()  # cloudpickled to the starter, not forked
    cfg = RunConfig(strategy="data", world_size=1, steps=3, device="cuda", run_dir=runs_dir)
    assert ddlkit.launch(cfg, echo=False).wait(timeout=120).status == "done"


def test_a_starter_killed_from_outside_fails_its_runs_cleanly_and_the_next_launch_gets_a_new_one(runs_dir):
    warm = forkserver.warm_starter()
    run = ddlkit.launch(sleepy_ranks, num_processes=2, run_dir=runs_dir, echo=False, start="warm")
    wait_until(lambda: len(run.metrics) == 2, 60)
    os.kill(warm.pid, signal.SIGKILL)
    with pytest.raises(ddlkit.RunFailed, match="killed by SIGKILL"):
        run.wait(timeout=30)
    wait_until(lambda: not any(running_in_process_group(pid) for pid in run.pids), 10)
    again = ddlkit.launch(whoami, num_processes=2, run_dir=runs_dir, echo=False, start="warm").wait(timeout=60)
    assert forkserver.current().pid != warm.pid
    assert set(again.metrics["parent"]) == {forkserver.current().pid}


def sleepy_ranks():
    ddlkit.log(step=0)
    time.sleep(600)


def test_a_control_panel_starts_the_starter_in_the_background(monkeypatch):
    from ddlkit.view import control_panel

    calls = []
    monkeypatch.setattr(control_panel, "warm_up", lambda: calls.append(time.time()))
    control_panel.ControlPanel(RunConfig(steps=5, device="cpu"))
    assert len(calls) == 1  # so that its Run click finds the starter ready


def test_a_kernels_first_launch_returns_at_once_while_the_starter_preloads(runs_dir):
    if forkserver.current() is not None:
        forkserver.current().close()  # as in a fresh kernel
    RunConfig(steps=3, batch_size=8, run_dir=runs_dir).validate()  # the kernel imports every strategy once (~1 s)
    started = time.perf_counter()
    run = ddlkit.launch(RunConfig(steps=3, batch_size=8, run_dir=runs_dir), echo=False)
    assert time.perf_counter() - started < 0.5
    # The supervisor's thread starts the ranks once the starter is ready, waiting for it meanwhile; a look
    # from another thread (a second launch, a ControlPanel) must not wait with it (it once did, for seconds).
    waiting = threading.Thread(target=forkserver.current().wait_ready)
    waiting.start()
    time.sleep(0.05)
    looked = time.perf_counter()
    assert not forkserver.current().is_ready()
    assert time.perf_counter() - looked < 0.1
    assert run.status == "starting"
    waiting.join(timeout=60)
    assert run.wait(timeout=120).status == "done"


def test_warm_up_starts_the_starter_in_the_background_and_a_launch_then_takes_it_ready(runs_dir):
    if forkserver.current() is not None:
        forkserver.current().close()  # as in a fresh kernel
    started = time.perf_counter()
    ddlkit.warm_up()  # a notebook's first cell
    assert time.perf_counter() - started < 0.5 and not forkserver.current().is_ready()  # preloading meanwhile
    starter = forkserver.current()
    starter.wait_ready()
    run = ddlkit.launch(RunConfig(steps=3, batch_size=8, run_dir=runs_dir), echo=False).wait(timeout=120)
    assert run.status == "done" and forkserver.current() is starter  # the same starter forked its ranks


def test_a_launchs_ranks_are_the_spares_the_starter_forked_ahead_and_new_ones_follow(runs_dir):
    """No fork on a launch's path: its ranks are processes the starter forked
    before (each leading its own group, waiting), and it forks new ones after."""
    warm = forkserver.warm_starter()
    wait_until(lambda: len(warm.probe()["spares"]) == 2, 10)
    spares = warm.probe()["spares"]
    for pid in spares:
        assert alive(pid) and os.getpgid(pid) == pid and pid in children_of(warm.pid)
    run = ddlkit.launch(whoami, num_processes=2, run_dir=runs_dir, echo=False, start="warm").wait(timeout=60)
    assert sorted(run.pids) == sorted(spares) == sorted(run.metrics["pid"])  # they became the ranks
    assert set(run.metrics["group"]) == set(spares) and not any(run.metrics["cuda"])
    wait_until(lambda: len(warm.probe()["spares"]) == 2, 10)
    assert not set(warm.probe()["spares"]) & set(spares)  # new ones, forked after the launch
    for pid in spares:
        wait_until(lambda: not running_in_process_group(pid), 10)  # noqa: B023 (waited on right here)


def test_a_spare_killed_from_outside_is_replaced_and_launches_go_on(runs_dir):
    warm = forkserver.warm_starter()
    wait_until(lambda: len(warm.probe()["spares"]) == 2, 10)
    victim = warm.probe()["spares"][0]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: victim not in warm.probe()["spares"] and len(warm.probe()["spares"]) == 2, 10)
    wait_until(lambda: not alive(victim), 10)  # reaped, not a zombie
    run = ddlkit.launch(whoami, num_processes=2, run_dir=runs_dir, echo=False, start="warm").wait(timeout=60)
    assert run.status == "done" and victim not in run.pids


def test_a_spare_that_ended_before_its_request_is_skipped_and_reaped():
    """The starter hands a request to the next spare (or a fresh fork) when the one
    it took ended in the meantime (its pipe is broken), instead of failing."""
    from ddlkit.rank import forkserver as starter

    request_read, request_write = os.pipe()
    output_read, output_write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.close(request_read)  # its end of the pipe is gone with it
    wait_until(lambda: not alive(pid), 10)  # ended, not reaped yet
    dead = starter.Waiting(pid, request_write, output_read)
    fresh_read, fresh_write = os.pipe()
    fresh_output, fresh_output_write = os.pipe()
    fresh = starter.Waiting(424242, fresh_write, fresh_output)
    kernel, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with kernel, ours:
        started = starter.start_rank({"op": "start", "argv": ["x"]}, [dead], lambda: fresh, ours)
        assert started == 424242
        message, fds, _, _ = socket.recv_fds(kernel, 1024, 1)
        assert json.loads(message) == {"op": "started", "pid": 424242} and len(fds) == 1
        with os.fdopen(fresh_read, "rb") as got:
            assert json.loads(got.read())["argv"] == ["x"]  # the request reached the fresh one
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # the ended spare was reaped
    for fd in (*fds, output_write, fresh_output_write):
        os.close(fd)


def _environment_size(name):
    ddlkit.log(step=0, size=len(os.environ[name]))


def test_a_request_larger_than_a_pipe_reaches_its_spare_whole(runs_dir, monkeypatch):
    monkeypatch.setenv("DDLKIT_TEST_LARGE", "x" * 100_000)  # the kernel's environment travels with each request
    run = ddlkit.launch(
        _environment_size, "DDLKIT_TEST_LARGE", num_processes=2, run_dir=runs_dir, echo=False, start="warm"
    ).wait(timeout=60)
    assert list(run.metrics["size"]) == [100_000, 100_000]


def test_ranks_asked_of_the_starter_together_are_ended_if_not_all_of_them_started(tmp_path, monkeypatch):
    """A launch's requests go to the starter together and the answers are read after (no round
    trip per rank); if an answer does not come, the ranks that did start are killed and the
    launch is told (StarterUnavailable: it then spawns them all)."""
    warm = forkserver.warm_starter()
    warm.wait_ready()
    answered = []
    real_ask = forkserver.WarmStarter._ask

    def first_answer_only(self, requests, answer):
        replies = real_ask(self, requests, answer)
        if answer != "started":  # a probe
            return replies
        answered.extend(replies)
        assert len(replies) == len(requests) == 2  # the starter answered both requests
        return replies[:1]  # ... but the second answer is lost

    monkeypatch.setattr(forkserver.WarmStarter, "_ask", first_answer_only)
    env = {"DDLKIT_RUN_DIR": str(tmp_path), "DDLKIT_ARGS": "[60]"}
    try:
        with pytest.raises(forkserver.StarterUnavailable, match="did not start every rank"):
            warm.start(["--function", "time:sleep"], [env, env], 1)
        started = answered[0][0]["pid"]
        wait_until(lambda: warm.exit_code(started) is not None, 10)
        assert warm.exit_code(started) == -signal.SIGKILL
    finally:
        for reply, fds in answered[1:]:  # the one whose answer was lost: this test's to end
            os.killpg(reply["pid"], signal.SIGKILL)
            wait_until(lambda: warm.exit_code(reply["pid"]) is not None, 10)  # noqa: B023 (waited on here)
            for fd in fds:
                os.close(fd)
