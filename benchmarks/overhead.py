"""ddlkit's overhead against its anchors, side by side in one run.

1. Step time: ddlkit's ``data`` strategy against a bare accelerate DDP loop
   (``ddlkit.rank.examples.train_digits`` reporting nothing), same model, data,
   batch and process count, both in freshly spawned interpreters. Both are timed inside the workers, first step to
   last; ddlkit's side includes everything it adds per step (timing hook,
   ``loss.item()``, one event to the kernel).
2. Launch latency: from the call to the first event, ``ddlkit.launch(fn)``
   against ``accelerate.notebook_launcher(fn)`` running the same function
   (``Accelerator()``, then report). ddlkit's first event is timed on arrival in
   the kernel, notebook_launcher's when the worker writes it: that favours the
   anchor. ddlkit's spawned start for built-in configs is shown too.

Repetitions alternate between the two sides so that drift in the machine
affects both; medians are reported.

    python benchmarks/overhead.py [--reps 5] [--steps 300] [--world-size 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

from table import print_table, row

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


def step_rows(reps: int, steps: int, world_size: int, batch_size: int, hiddens: list[int], runs: str) -> list[dict]:
    """Step time of ``data`` against the bare accelerate DDP loop, per MLP width."""
    out = []
    for hidden in hiddens:
        ours, bare = step_times(reps, steps, world_size, batch_size, hidden, runs)
        out.append(
            row(
                f"step time, data, mlp hidden={hidden} (ms)",
                statistics.median(ours) * 1e3,
                statistics.median(bare) * 1e3,
                "bare accelerate DDP loop",
                "<= 1.02",
            )
        )
    return out


def rows(
    quick: bool = False,
    reps: int | None = None,
    steps: int = 300,
    world_size: int = 2,
    batch_size: int = 64,
    hiddens: tuple[int, ...] = (256,),
) -> list[dict]:
    """The step-time rows (``quick``: 3 repetitions of 200 steps); launches: launch_latency.py."""
    os.environ["ACCELERATE_USE_CPU"] = "1"  # else notebook_launcher's ranks are N single processes on CPU
    reps = reps or (3 if quick else 5)
    steps = 200 if quick else steps
    with tempfile.TemporaryDirectory() as runs:
        return step_rows(reps, steps, world_size, batch_size, list(hiddens), runs)


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
        help="MLP widths (256: a ~2.8 ms step here): ddlkit's cost is about fixed per step, so it shows less "
        "on larger ones",
    )
    opts = parser.parse_args()
    table = rows(False, opts.reps, opts.steps, opts.world_size, opts.batch_size, tuple(opts.hidden))
    print(
        f"\n{opts.world_size} CPU processes, mlp on digits, batch {opts.batch_size}/rank, one event per step, "
        f"{opts.steps} steps, median of {opts.reps} alternating repetitions "
        f"({len(os.sched_getaffinity(0))} cores, torch {__import__('torch').__version__})\n"
    )
    print_table(table)


if __name__ == "__main__":
    sys.exit(main())
