"""ddlkit.launch: returns at once, forms one group, tags output, stays on loopback."""

from __future__ import annotations

import socket
import time

import pytest

import ddlkit
from ddlkit import RunConfig
from ddlkit.kernel.launch import function_plan


def _group_info(lines):
    from accelerate import Accelerator

    accelerator = Accelerator()
    ddlkit.log(step=0, distributed=str(accelerator.distributed_type), processes=accelerator.num_processes)
    for i in range(lines):
        print(f"line {i} of rank {accelerator.process_index} " + "x" * 200)


def test_a_plain_accelerator_finds_one_group_of_n_on_cpu(runs_dir):
    run = ddlkit.launch(_group_info, 0, num_processes=3, run_dir=runs_dir, echo=False).wait(timeout=60)
    table = run.metrics
    assert sorted(table["rank"]) == [0, 1, 2]
    assert set(table["distributed"]) == {"DistributedType.MULTI_CPU"}
    assert set(table["processes"]) == {3}


def _one_rank_lingers(seconds):
    from accelerate import Accelerator

    accelerator = Accelerator()
    if accelerator.process_index == 1:
        time.sleep(seconds)
    ddlkit.log(step=0, returned=time.time())


def test_ranks_leave_the_group_together(runs_dir):
    """A rank whose function returned waits for its peers before tearing the group down (CI saw a 3-rank
    plain Accelerator() fail: a fast rank left while gloo still connected a slow one, "Connection closed by peer")."""
    run = ddlkit.launch(_one_rank_lingers, 1.0, num_processes=3, run_dir=runs_dir, echo=False).wait(timeout=60)
    returned = run.metrics.set_index("rank")["returned"]
    left = {e["rank"]: e["time"] for e in run.events if e["type"] == "finished"}
    assert returned[0] < returned[1] - 0.8  # rank 0's function was done a second earlier...
    assert min(left.values()) >= returned[1]  # ... and no rank left before rank 1 was done too


def test_launch_returns_at_once(runs_dir):
    for target, kwargs in [
        (RunConfig(steps=5, run_dir=runs_dir), {}),
        (_group_info, {"num_processes": 2, "run_dir": runs_dir}),
    ]:
        args = (0,) if callable(target) else ()
        started = time.perf_counter()
        run = ddlkit.launch(target, *args, echo=False, **kwargs)
        assert time.perf_counter() - started < 0.5
        assert run.status in ("starting", "running")
        run.wait(timeout=120)


def test_output_arrives_tagged_by_rank_in_whole_lines(runs_dir):
    lines = []
    ddlkit.launch(_group_info, 300, num_processes=2, run_dir=runs_dir, echo=lines.append).wait(timeout=60)
    for rank in (0, 1):
        mine = [ln for ln in lines if ln.startswith(f"[rank {rank}] ")]
        assert mine == [f"[rank {rank}] line {i} of rank {rank} " + "x" * 200 for i in range(300)]


def test_a_function_given_by_name_runs_in_fresh_interpreters(runs_dir):
    run = ddlkit.launch(
        "ddlkit.rank.examples:train_digits", 10, 16, num_processes=2, run_dir=runs_dir, echo=False
    ).wait(timeout=120)
    assert len(run.metrics) == 20
    returns = run.result().returns
    assert returns[0]["steps"] == returns[1]["steps"] == 10


def _listening_addresses(port):
    found = []
    for line in open("/proc/net/tcp").read().splitlines()[1:] + open("/proc/net/tcp6").read().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.rsplit(":", 1)
        if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
            found.append(address)
    return found


def _slow(seconds):
    time.sleep(seconds)


def test_ports_listen_on_loopback_only_and_strangers_are_refused(runs_dir):
    run = ddlkit.launch(_slow, 3, num_processes=2, run_dir=runs_dir, echo=False)
    for port in run.ports:
        assert _listening_addresses(port) == ["0100007F"]  # 127.0.0.1, nothing else
    # A local process without the run's token cannot inject events.
    with socket.create_connection(("127.0.0.1", run.ports[1])) as intruder:
        intruder.recv(32)
        intruder.sendall(b"\x00\x00\x00\x00" + b"\x00" * 32)
        assert intruder.recv(1) == b""  # closed on it
    assert run.wait(timeout=60).status == "done"
    assert run.metrics.empty


def test_a_notebook_function_is_cloudpickled_once_forking_the_kernel_is_unsafe(monkeypatch):
    import io
    import pickle
    import sys

    import torch

    def local_train(scale):
        return 2 * scale

    assert function_plan(local_train, (1,), "auto") == (None, None)  # no CUDA here: the kernel is forked
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    argv, payload = function_plan(local_train, (21,), "auto")
    assert argv == ["--pickled", "function.pkl"]
    file = io.BytesIO(payload)
    assert pickle.load(file) == sys.path  # the ranks import as the kernel does
    function, args = pickle.load(file)
    assert function(*args) == 42
    monkeypatch.undo()
    assert function_plan(local_train, (1,), "warm")[0] == ["--pickled", "function.pkl"]  # forced
    assert function_plan("ddlkit.rank.examples:train_digits", (), "auto") == (
        ["--function", "ddlkit.rank.examples:train_digits"],
        None,
    )


def test_bad_targets_are_refused_before_anything_starts(runs_dir):
    with pytest.raises(TypeError, match="takes a RunConfig, a function"):
        ddlkit.launch(42)
    with pytest.raises(ValueError, match="'package.module:function'"):
        ddlkit.launch("no_colon_here", run_dir=runs_dir)
    with pytest.raises(TypeError, match="JSON values"):
        ddlkit.launch("ddlkit.rank.examples:train_digits", object(), run_dir=runs_dir)
    with pytest.raises(TypeError, match="pass world_size in the config"):
        ddlkit.launch(RunConfig(), num_processes=2)


# ---- configs survive the trip to the workers ---------------------------------
def test_a_learning_rate_of_1e_minus_5_reaches_the_workers(runs_dir):
    """JSON writes 1e-05 with an exponent; a worker that read config.json as
    YAML got the string '1e-05' and every rank failed its own validation."""
    cfg = RunConfig(strategy="data", world_size=2, steps=3, batch_size=8, lr=1e-5, optimizer="adam", run_dir=runs_dir)
    run = ddlkit.launch(cfg, echo=False).wait(timeout=120)
    assert run.status == "done"
    assert set(run.metrics["lr"]) == {1e-5}


def test_a_rank_that_fails_before_its_loop_still_reports_its_traceback(runs_dir):
    from ddlkit import registry

    from . import plugin_that_fails_in_workers as plugin

    try:
        cfg = RunConfig(strategy=plugin.NAME, world_size=2, steps=3, batch_size=8, run_dir=runs_dir)
        run = ddlkit.launch(cfg, echo=False)
        with pytest.raises(ddlkit.RunFailed) as info:
            run.wait(timeout=120)
    finally:
        registry.unregister(plugin.NAME)
    message = str(info.value)
    assert "without a traceback" not in message
    assert "raised: ImportError: plugin_that_fails_in_workers needs a package that the workers lack" in message
    assert "traceback of rank" in message and "RunConfig.load" in message  # the frames, not just the last line
