"""Parameter server throughput with one 3x straggler: async (and ssp) against
bsp, side by side in one run.

One server and ``--workers`` workers on CPU; every worker's step is ``--work-ms``
of simulated work (``delay_s``) plus the tiny model's real step, and the last
worker is three times slower (``slowdown``). Throughput is samples per second
over all workers while all of them are still working
(``ddlkit.staleness.throughput_while_all_work``): after the fast ones finish,
the straggler runs alone in any mode. Repetitions alternate the modes so that
drift in the machine affects all; medians are reported. Ideal async/bsp with
2 workers: (1 + 1/3) / (2/3) = 2x.

    python benchmarks/async_ps.py [--reps 3] [--steps 40] [--workers 2] [--work-ms 20]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

from table import row

import ddlkit
from ddlkit import staleness

MODES = ("bsp", "async", "ssp")


def measure(reps: int, steps: int, workers: int, work_ms: float, staleness_bound: int) -> tuple[dict, dict]:
    """Samples per second while all workers work, and the worst staleness, per mode (alternating repetitions)."""
    world_size = workers + 1
    straggler = world_size - 1
    base = ddlkit.RunConfig(
        strategy="ps",
        world_size=world_size,
        model="mlp",
        dataset="digits",
        hidden=32,
        steps=steps,
        batch_size=16,
        lr=0.1,
        device="cpu",
        run_dir=tempfile.mkdtemp(),
        delay_s={w: work_ms / 1000 for w in range(1, world_size)},
        slowdown={straggler: 3.0},
        staleness_bound=staleness_bound,
    )
    rates: dict[str, list[float]] = {m: [] for m in MODES}
    worst: dict[str, int] = {m: 0 for m in MODES}
    for _ in range(reps):
        for mode in MODES:
            run = ddlkit.launch(base.replace(sync=mode), echo=False).wait(600)
            rates[mode].append(staleness.throughput_while_all_work(run))
            worst[mode] = max(worst[mode], int(staleness.staleness_table(run)["staleness"].max()))
    return rates, worst


def rows(quick: bool = False, reps: int = 3, steps: int = 40) -> list[dict]:
    """async and ssp against bsp with 2 workers, one 3x slower (ideal async: 2x;
    ``quick``: 1 repetition of 30 steps)."""
    rates, _ = measure(1, 30, 2, 20.0, 2) if quick else measure(reps, steps, 2, 20.0, 2)
    bsp = statistics.median(rates["bsp"])
    return [
        row(f"parameter server {mode}, 3x straggler (samples/s)", statistics.median(rates[mode]), bsp, "ps bsp", aim)
        for mode, aim in (("async", ">= 1.5"), ("ssp", None))  # ssp trades some of async's speed for bounded staleness
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--work-ms", type=float, default=20.0)
    parser.add_argument("--staleness-bound", type=int, default=2)
    opts = parser.parse_args()
    rates, worst = measure(opts.reps, opts.steps, opts.workers, opts.work_ms, opts.staleness_bound)
    anchor = statistics.median(rates["bsp"])
    print(
        f"{opts.workers} workers, rank {opts.workers} 3x slower, {opts.work_ms:g} ms work/step, "
        f"{opts.steps} steps, median of {opts.reps}"
    )
    print(f"{'mode':<12}{'samples/s':>12}{'vs bsp':>10}{'max staleness':>16}")
    for mode in MODES:
        label = f"ssp (s={opts.staleness_bound})" if mode == "ssp" else mode
        rate = statistics.median(rates[mode])
        print(f"{label:<12}{rate:>12.0f}{rate / anchor:>9.2f}x{worst[mode]:>16}")


if __name__ == "__main__":
    main()
