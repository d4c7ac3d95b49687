"""Launch to first event: ddlkit against ``accelerate.notebook_launcher``,
side by side in one run (repetitions alternate; medians are reported).

ddlkit's first event is timed on arrival in the kernel, notebook_launcher's
when its worker writes it: that favours the anchor. A built-in config's first
event is its first training step, so its anchor runs the same first step
(``first_training_step``: the same model, data and DDP through accelerate);
a function's is the function's report after ``Accelerator()``
(``report_first_event``), on both sides.

Rows: a built-in config from a kernel whose warm starter is ready (after
``ddlkit.kernel.forkserver.warm_up()`` or a ControlPanel; a fresh Python
process per repetition), the same as a kernel's very first launch (the
starter preloads torch then), a second launch in the same kernel, the old
spawned start (``start="spawn"``, what built-in configs did before the
starter), a notebook function forked from the kernel, and the same function
cloudpickled to the starter: the path taken once CUDA is initialised in the
kernel (on a GPU machine CUDA is initialised first; on CPU ``start="warm"``
takes the same path).

    python benchmarks/launch_latency.py [--reps 5] [--world-size 2]

``launch_rows(reps, world_size)`` returns the rows as (measure, ddlkit,
anchor, ratio, aim) for a collected table.
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

ANCHOR = "accelerate.notebook_launcher"
# (measure, how ddlkit launches, aim as a ratio to notebook_launcher)
LAUNCHES = [
    ("launch to first event, built-in config, starter ready (s)", "config", 0.5),
    ("launch to first event, built-in config, kernel's first launch (s)", "config-cold", None),
    ("launch to first event, second launch in the same kernel (s)", "config-again", 0.3),
    ("launch to first event, built-in config, start='spawn' (s)", "spawn", None),
    ("launch to first event, notebook function, forked (s)", "function", 1.0),
    ("launch to first event, notebook function, cloudpickled (s)", "pickled", 1.0),
]
CONFIG_ROWS = ("config", "config-cold", "config-again", "spawn")


def report_first_event(stamp_dir: str | None = None) -> None:
    """The same function for both launchers: join the group, then report."""
    from accelerate import Accelerator

    accelerator = Accelerator()
    if stamp_dir is None:
        ddlkit.log(step=0, rank_time=time.time())
    else:
        Path(stamp_dir, f"rank{accelerator.process_index}").write_text(repr(time.time()))


def first_training_step(stamp_dir: str) -> None:
    """notebook_launcher's side of a built-in config: one step of the bare accelerate loop, then report."""
    from ddlkit.rank.examples import train_digits

    train_digits(steps=1, batch_size=32, log_every=0)
    Path(stamp_dir, f"rank{os.environ['RANK']}").write_text(repr(time.time()))


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
import sys
import ddlkit
sys.path.insert(0, {here!r})
from launch_latency import config_launch, first_event_after
if sys.argv[1] == "warm":
    ddlkit.kernel.forkserver.warm_starter()  # ready, as after warm_up() or a ControlPanel
print(first_event_after(config_launch({world_size}, {runs!r})))
"""


def fresh_kernel_latency(world_size: int, runs: str, starter: str) -> float:
    """A built-in config's first launch in a new Python process (torch imported, as in a kernel)."""
    script = FRESH_KERNEL.format(here=str(Path(__file__).parent), world_size=world_size, runs=runs)
    out = subprocess.run([sys.executable, "-c", script, starter], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def notebook_launcher_latency(world_size: int, function=report_first_event) -> float:
    from accelerate import notebook_launcher

    with tempfile.TemporaryDirectory() as stamps, socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        started = time.time()
        notebook_launcher(function, (stamps,), num_processes=world_size, use_port=str(port))
        return min(float(p.read_text()) for p in Path(stamps).iterdir()) - started


def launch_rows(reps: int = 5, world_size: int = 2) -> list[tuple[str, float, float, float, float | None]]:
    """(measure, ddlkit, anchor, ratio, aim) for each launch, the anchor being
    notebook_launcher in the same run (medians of ``reps`` alternating repetitions)."""
    os.environ["ACCELERATE_USE_CPU"] = "1"  # else notebook_launcher's ranks are N single processes on CPU
    pickled_start = "auto" if torch.cuda.is_available() else "warm"
    if torch.cuda.is_available():
        torch.zeros(1, device="cuda")  # CUDA initialised in the kernel: a notebook function is cloudpickled
    ours: dict[str, list[float]] = {how: [] for _, how, _ in LAUNCHES}
    anchor: dict[str, list[float]] = {"step": [], "report": []}
    with tempfile.TemporaryDirectory() as runs:
        first_event_after(config_launch(world_size, runs))  # this kernel's first launch: the rest are later ones
        for _ in range(reps):
            ours["config-cold"].append(fresh_kernel_latency(world_size, runs, "cold"))
            ours["config"].append(fresh_kernel_latency(world_size, runs, "warm"))
            anchor["step"].append(notebook_launcher_latency(world_size, first_training_step))
            anchor["report"].append(notebook_launcher_latency(world_size))
            ours["config-again"].append(first_event_after(config_launch(world_size, runs)))
            if not torch.cuda.is_initialized():  # no forked row once CUDA is initialised
                ours["function"].append(first_event_after(function_launch(world_size, runs)))
            ours["pickled"].append(first_event_after(function_launch(world_size, runs, pickled_start)))
            ours["spawn"].append(first_event_after(config_launch(world_size, runs, "spawn")))
    med = statistics.median
    rows = []
    for measure, how, aim in LAUNCHES:
        if ours[how]:
            theirs = med(anchor["step" if how in CONFIG_ROWS else "report"])
            rows.append((measure, med(ours[how]), theirs, med(ours[how]) / theirs, aim))
    return rows


def rows(quick: bool = False) -> list[dict]:
    """The launch rows for ``python -m benchmarks`` (``quick``: 2 repetitions)."""
    from table import row

    return [
        row(measure, ours, theirs, ANCHOR, f"<= {aim}" if aim else None)
        for measure, ours, theirs, _, aim in launch_rows(2 if quick else 5, 2)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--world-size", type=int, default=2)
    opts = parser.parse_args()
    rows = launch_rows(opts.reps, opts.world_size)
    print(
        f"\n{opts.world_size} CPU processes, median of {opts.reps} alternating repetitions "
        f"({len(os.sched_getaffinity(0))} cores, torch {torch.__version__}); the anchor: {ANCHOR}\n"
    )
    print(f"{'measure':<100} {'ddlkit':>7} {'anchor':>7} {'ratio':>7}  {'aim':>6}")
    for name, ours_value, anchor_value, ratio, aim in rows:
        aim_text = f"<={aim:.2f}" if aim else ""
        print(f"{name:<100} {ours_value:>7.3f} {anchor_value:>7.3f} {ratio:>7.3f}  {aim_text:>6}")


if __name__ == "__main__":
    sys.exit(main())
