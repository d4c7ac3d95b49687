"""ddlkit's overhead against its anchors, side by side in one run.

1. Step time: ddlkit's ``data`` strategy against a bare accelerate DDP loop
   (``ddlkit.rank.examples.train_digits`` reporting nothing), same model, data,
   batch and process count, both in freshly spawned interpreters. Both are timed inside the workers, first step to
   last; ddlkit's side includes everything it adds per step (timing hook,
   ``loss.item()``, one event to the kernel).
2. Launch latency (``launch_rows``): from the call to the first event, ddlkit
   against ``accelerate.notebook_launcher(fn)`` running the same function
   (``Accelerator()``, then report), alternating in the same run. ddlkit's first
   event is timed on arrival in the kernel, notebook_launcher's when the worker
   writes it: that favours the anchor. Rows: a built-in config from a kernel
   whose warm starter is ready (after ``ddlkit.warm_up()`` or a ControlPanel),
   the same as a kernel's first launch (the starter preloads torch then: a fresh
   Python process per repetition), a second launch in the same kernel, a
   notebook function forked from the kernel, the same function cloudpickled to
   the starter (the path taken once CUDA is initialised in the kernel: on a GPU
   machine CUDA is initialised first; on CPU ``start="warm"`` takes the same
   path), and the old spawned start (``start="spawn"``).

Repetitions alternate between the two sides so that drift in the machine
affects both; medians are reported.

    python benchmarks/overhead.py [--reps 5] [--steps 300] [--world-size 2] [--only steps|launch]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import ddlkit


def step_times(reps: int, steps: int, world_size: int, batch_size: int, hidden: int, runs: str) -> tuple[list, list]:
    cfg = ddlkit.RunConfig(
        strategy="data",
        world_size=world_size,
        model="mlp",
        dataset="digits",
        steps=steps,
        batch_size=batch_size,
        lr=0.05,
        hidden=hidden,
        device="cpu",
        run_dir=runs,
    )
    ours, bare = [], []
    for _ in range(reps):
        summary = ddlkit.launch(cfg, echo=False).wait(600).summary
        ours.append(summary["train_s"] / steps)
        # Spawned by name, as ddlkit's built-in runs are: a forked interpreter
        # runs the same loop ~5 % faster here, which is not ddlkit's doing.
        returns = (
            ddlkit.launch(
                "ddlkit.rank.examples:train_digits",
                steps,
                batch_size,
                0.05,
                0,
                0,
                hidden,
                num_processes=world_size,
                device="cpu",
                run_dir=runs,
                echo=False,
            )
            .wait(600)
            .result()
            .returns
        )
        bare.append(max(r["step_time"] for r in returns.values()))
    return ours, bare


def report_first_event(stamp_dir: str | None = None) -> None:
    """The same function for both launchers: join the group, then report."""
    from accelerate import Accelerator

    accelerator = Accelerator()
    if stamp_dir is None:
        ddlkit.log(step=0, rank_time=time.time())
    else:
        Path(stamp_dir, f"rank{accelerator.process_index}").write_text(repr(time.time()))


def first_event_after(start_launch) -> float:
    """Seconds from ``start_launch()`` (which returns a Run) to its first event in the kernel."""
    started = time.time()
    run = start_launch()
    while run.steps_done == 0 and run.status in ("starting", "running"):
        time.sleep(0.001)
    first = time.time() - started
    run.wait(120)
    return first


def config_launch(world_size: int, runs: str, start: str | None = None):
    cfg = ddlkit.RunConfig(strategy="data", world_size=world_size, steps=5, device="cpu", run_dir=runs)
    return lambda: ddlkit.launch(cfg, echo=False, start=start)


def function_launch(world_size: int, runs: str, start: str | None = None):
    return lambda: ddlkit.launch(
        report_first_event, num_processes=world_size, device="cpu", run_dir=runs, echo=False, start=start
    )


FRESH_KERNEL = """
import sys, time
import ddlkit
sys.path.insert(0, {here!r})
from overhead import config_launch, first_event_after
if sys.argv[1] == "warm":
    ddlkit.kernel.forkserver.warm_starter()  # what ddlkit.warm_up() or a ControlPanel starts early
print(first_event_after(config_launch({world_size}, {runs!r})))
"""


def fresh_kernel_latency(world_size: int, runs: str, starter: str) -> float:
    """A built-in config's first launch in a new Python process (torch imported, as in a kernel)."""
    script = FRESH_KERNEL.format(here=str(Path(__file__).parent), world_size=world_size, runs=runs)
    out = subprocess.run([sys.executable, "-c", script, starter], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def notebook_launcher_latency(world_size: int) -> float:
    from accelerate import notebook_launcher

    with tempfile.TemporaryDirectory() as stamps, socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        started = time.time()
        notebook_launcher(report_first_event, (stamps,), num_processes=world_size, use_port=str(port))
        return min(float(p.read_text()) for p in Path(stamps).iterdir()) - started


LAUNCHES = [  # (measure, how ddlkit launches, aim as a ratio to notebook_launcher)
    ("launch to first event, built-in config, starter ready (s)", "config", 0.5),
    ("launch to first event, built-in config, kernel's first launch (s)", "config-cold", None),
    ("launch to first event, second launch in the same kernel (s)", "config-again", 0.3),
    ("launch to first event, notebook function, forked (s)", "function", 1.0),
    ("launch to first event, notebook function, cloudpickled (s)", "pickled", 1.0),
    ("launch to first event, built-in config, start='spawn' (s)", "spawn", None),
]


def launch_rows(reps: int = 5, world_size: int = 2) -> list[tuple[str, float, float, float, float | None]]:
    """(measure, ddlkit, anchor, ratio, aim) for launch to first event, each against
    notebook_launcher in the same run (medians of ``reps`` alternating repetitions)."""
    os.environ["ACCELERATE_USE_CPU"] = "1"  # else notebook_launcher's ranks are N single processes on CPU
    pickled_start = "auto" if torch.cuda.is_available() else "warm"
    if torch.cuda.is_available():
        torch.zeros(1, device="cuda")  # CUDA initialised in the kernel: a notebook function is cloudpickled
    ours: dict[str, list[float]] = {how: [] for _, how, _ in LAUNCHES}
    anchor: list[float] = []
    with tempfile.TemporaryDirectory() as runs:
        for _ in range(reps):
            ours["config-cold"].append(fresh_kernel_latency(world_size, runs, "cold"))
            ours["config"].append(fresh_kernel_latency(world_size, runs, "warm"))
            anchor.append(notebook_launcher_latency(world_size))
            ours["config-again"].append(first_event_after(config_launch(world_size, runs)))
            if not torch.cuda.is_initialized():
                ours["function"].append(first_event_after(function_launch(world_size, runs)))
            ours["pickled"].append(first_event_after(function_launch(world_size, runs, pickled_start)))
            ours["spawn"].append(first_event_after(config_launch(world_size, runs, "spawn")))
    med = statistics.median
    return [
        (measure, med(ours[how]), med(anchor), med(ours[how]) / med(anchor), aim)
        for measure, how, aim in LAUNCHES
        if ours[how]
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--hidden",
        type=int,
        nargs="+",
        default=[256, 1024],
        help="MLP widths: ddlkit's cost is about fixed per step, so it shows less on larger steps",
    )
    parser.add_argument("--only", choices=["steps", "launch"], help="measure only step time or only launches")
    opts = parser.parse_args()
    os.environ["ACCELERATE_USE_CPU"] = "1"  # else notebook_launcher's ranks are N single processes on CPU

    rows = []
    if opts.only != "launch":
        with tempfile.TemporaryDirectory() as runs:
            for hidden in opts.hidden:
                ours, bare = step_times(opts.reps, opts.steps, opts.world_size, opts.batch_size, hidden, runs)
                name = f"step time, data, mlp hidden={hidden} (ms), vs bare accelerate DDP loop"
                med = statistics.median
                rows.append((name, med(ours) * 1e3, med(bare) * 1e3, med(ours) / med(bare), 1.05))
    if opts.only != "steps":
        rows += launch_rows(opts.reps, opts.world_size)
    print(
        f"\n{opts.world_size} CPU processes, mlp on digits, batch {opts.batch_size}/rank, one event per step, "
        f"{opts.steps} steps, median of {opts.reps} alternating repetitions "
        f"({len(os.sched_getaffinity(0))} cores, torch {torch.__version__}); launches against "
        "accelerate.notebook_launcher\n"
    )
    print(f"{'measure':<72} {'ddlkit':>8} {'anchor':>8} {'ratio':>7}  {'aim':>6}")
    for name, ours_value, anchor_value, ratio, aim in rows:
        aim_text = f"<={aim:.2f}" if aim else ""
        print(f"{name:<72} {ours_value:>8.3f} {anchor_value:>8.3f} {ratio:>7.3f}  {aim_text:>6}")


if __name__ == "__main__":
    sys.exit(main())
