"""What a burst of ``ddlkit.log`` costs the loop that logs, and whether the
kernel gets every event: one rank under ``ddlkit.launch`` runs a loop of
fixed pure-Python work, in alternating blocks without and with one
``ddlkit.log`` per iteration (``ddlkit.rank.examples.logging_cost``), so the
anchor (the same loop, not logging) comes from the same process and run.

The work is sized to ~100 us an iteration on an idle core (10,000 iterations,
so 10,000 events, a second). The slowdown is the median over blocks of
logging / quiet time per iteration, on the wall clock and in the process's CPU
time (the reporter's thread included; steadier on a loaded machine). Lost
events: logged minus received by the kernel (exact).

    python benchmarks/log_burst.py [--blocks 10] [--iterations 10000] [--units 2700]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

from table import print_table, row

import ddlkit


def measure(blocks: int, iterations: int, units: int) -> tuple[dict[str, list[float]], int, int]:
    """Per-iteration times of the rank, events logged, and step rows the kernel received."""
    with tempfile.TemporaryDirectory() as runs:
        run = ddlkit.launch(
            "ddlkit.rank.examples:logging_cost", blocks, iterations, units, num_processes=1, run_dir=runs, echo=False
        ).wait(600)
        return run.result().returns[0], blocks * iterations, len(run.metrics)


def rows(quick: bool = False, blocks: int = 10, iterations: int = 10_000, units: int = 2700) -> list[dict]:
    """Slowdown (wall and CPU) and events lost (``quick``: 4 blocks of 5,000)."""
    blocks, iterations = (4, 5_000) if quick else (blocks, iterations)
    times, logged, received = measure(blocks, iterations, units)
    med = statistics.median
    name = "the same loop, not logging"
    return [
        row(
            "log burst: us per iteration, wall", med(times["logging"]) * 1e6, med(times["quiet"]) * 1e6, name, "<= 1.05"
        ),
        row(
            "log burst: us per iteration, CPU",
            med(times["logging_cpu"]) * 1e6,
            med(times["quiet_cpu"]) * 1e6,
            name,
            "<= 1.05",
        ),
        row("log burst: events lost", float(logged - received), 0.0, f"{logged:,} logged", None),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=10_000)
    parser.add_argument("--units", type=int, default=2700, help="busy_work units an iteration (~0.037 us each)")
    opts = parser.parse_args()
    print_table(rows(False, opts.blocks, opts.iterations, opts.units))


if __name__ == "__main__":
    main()
