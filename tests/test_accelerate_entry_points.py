"""Every accelerate entry point sees one N-rank group under ddlkit.launch on CPU:
accelerate's own test scripts, unmodified, and PartialState / Accelerator /
AcceleratorState made in either order, also when the kernel had made its own."""

from __future__ import annotations

import pytest

import ddlkit

SCRIPTS = "accelerate.test_utils.scripts"


def _run_script(module: str, runs_dir: str) -> list[str]:
    """accelerate's script ``module`` as the launched function, on 2 CPU ranks; its output lines."""
    lines: list[str] = []
    run = ddlkit.launch(
        f"{SCRIPTS}.{module}:main", num_processes=2, device="cpu", run_dir=runs_dir, echo=lines.append
    ).wait(timeout=120)
    assert run.status == "done"
    return lines


def test_accelerates_test_ops_sees_two_cpu_processes(runs_dir):
    """test_ops.py starts with a plain PartialState(), gathers/reduces across it and
    prints through it: on the main process only, so rank 1 says nothing."""
    lines = _run_script("test_ops", runs_dir)
    printed = [line.removeprefix("[rank 0] ") for line in lines if line.startswith("[rank 0] ")]
    assert printed[0] == "State: Distributed environment: DistributedType.MULTI_CPU  Backend: gloo"
    assert "Num processes: 2" in printed and "Process index: 0" in printed
    assert printed[-1] == "testing sending tensors across devices"  # the last check ran, and the run ended "done"
    assert [line for line in lines if line.startswith("[rank 1] ")] == []


def test_accelerates_test_script_sees_two_cpu_processes(runs_dir):
    lines = _run_script("test_script", runs_dir)
    for rank in (0, 1):
        assert f"[rank {rank}] Distributed environment: DistributedType.MULTI_CPU  Backend: gloo" in lines
        assert f"[rank {rank}] Num processes: 2" in lines
    assert "[rank 0] **Test process execution**" in lines  # all processes on this node: its multi-process checks
    assert "[rank 0] Training yielded the same results on one CPU or distributed setup with batch split." in lines


def test_accelerates_test_sync_runs_its_distributed_checks(runs_dir):
    """test_sync.py prints its state by the checks it chooses: these two run on MULTI_CPU only."""
    lines = _run_script("test_sync", runs_dir)
    assert "[rank 0] **Test Distributed `no_sync` context manager**" in lines
    assert "[rank 0] **Test Distributed `no_sync` context manager with multiple forwards**" in lines
    assert "[rank 0] **Test NOOP `no_sync` context manager**" not in lines


def _states(first: str) -> None:
    from accelerate import Accelerator, PartialState
    from accelerate.state import AcceleratorState

    made = [PartialState(), Accelerator()] if first == "partial" else [Accelerator(), PartialState()]
    made.append(AcceleratorState())
    ddlkit.log(
        step=0,
        types=",".join(str(m.distributed_type) for m in made),
        sizes=",".join(str(m.num_processes) for m in made),
        indices=",".join(str(m.process_index) for m in made),
    )


@pytest.mark.parametrize("first", ["partial", "accelerator"])
def test_partial_state_accelerator_and_accelerator_state_in_either_order(runs_dir, first):
    """Forked from this process, which made its own one-process PartialState first."""
    from accelerate.state import AcceleratorState, PartialState

    kernels = PartialState()  # a notebook that used accelerate before launching
    assert kernels.num_processes == 1
    try:
        run = ddlkit.launch(_states, first, num_processes=2, device="cpu", run_dir=runs_dir, echo=False)
        table = run.wait(timeout=60).metrics.sort_values("rank")
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert list(table["types"]) == [",".join(["DistributedType.MULTI_CPU"] * 3)] * 2
    assert list(table["sizes"]) == ["2,2,2"] * 2
    assert list(table["indices"]) == ["0,0,0", "1,1,1"]
