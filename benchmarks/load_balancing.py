"""Load balancing, side by side in one run: throughput and idle fraction of
data parallelism with one slow rank, balance none vs static vs dynamic, at
speed ratios 1, 1.5, 2 and 3; pipeline step time with parameter-count cuts vs
``cut_points="auto"`` on the long-window LM; and what the comm timing costs.

Data parallel: 2 ranks, rank 1 at speed 1/ratio (``speeds``), an MLP with
``--hidden`` units and ``--batch`` samples per rank (compute must outweigh the
all-reduce, which a speed does not scale). Throughput and rank 0's idle
fraction are measured from step ``--steady`` on (after warm-up and the first
re-shares; ``ddlkit.balance``). Ideal balanced/none at ratio r: (r + 1) / 2
(a step's time unbalanced: r halves of work; shared by speed: 2r / (r + 1)).
Repetitions alternate the modes so that drift in the machine affects all;
medians are reported.

Timing cost: a DDP rank's step time with every step sampled (``time_every=1``)
against none after step 0, the difference being the sampled steps' price;
and the Python cost of the hook on an unsampled step, measured in-process
against calling the inner hook directly.

``--sample-work-ms`` adds simulated compute per sample (``sample_work_s``: a
sleep scaled by the rank's speed), which a machine shared with other jobs
cannot disturb; without it the work is the real MLP's (noisy under load).

    python benchmarks/load_balancing.py [--reps 3] [--steps 60] [--hidden 512] [--batch 512] [--sample-work-ms 0]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from table import row

import ddlkit
from ddlkit import balance
from ddlkit.strategies.commtimer import CommTimer

MODES = ("none", "static", "dynamic")
RATIOS = (1.0, 1.5, 2.0, 3.0)


def data_runs(opts: argparse.Namespace, ratio: float, run_dir: str) -> tuple[dict, dict]:
    """Throughput and (rank 0, rank 1) idle fractions per balance mode, rank 1 at speed 1/ratio."""
    base = ddlkit.RunConfig(strategy="data", world_size=2, model="mlp", dataset="digits", hidden=opts.hidden,
                            batch_size=opts.batch, steps=opts.steps, lr=0.05, device="cpu", run_dir=run_dir,
                            time_every=2, balance_every=10, sample_work_s=opts.sample_work_ms / 1000)  # fmt: skip
    speed: dict[str, list[float]] = {m: [] for m in MODES}
    idle: dict[str, list[tuple[float, float]]] = {m: [] for m in MODES}
    for _ in range(opts.reps):
        for mode in MODES:
            run = ddlkit.launch(base.replace(speeds={1: 1 / ratio}, balance=mode), echo=False).wait(600)
            speed[mode].append(balance.throughput(run, from_step=opts.steady))
            table = balance.idle_table(run, from_step=opts.steady)["idle_fraction"]
            idle[mode].append((table[0], table[1]))
    return speed, idle


def data_parallel(opts: argparse.Namespace, run_dir: str) -> None:
    work = f"simulated work {opts.sample_work_ms} ms/sample" if opts.sample_work_ms else "real compute only"
    print(f"data parallel, 2 ranks, rank 1 at speed 1/ratio, MLP hidden {opts.hidden}, batch {opts.batch}/rank, "
          f"{work}; steps {opts.steady}..{opts.steps - 1}, medians of {opts.reps}")  # fmt: skip
    print(f"{'ratio':>5} {'mode':>8} {'samples/s':>10} {'x none':>7} {'ideal':>6} {'idle r0':>8} {'idle r1':>8}")
    for ratio in RATIOS:
        speed, idle = data_runs(opts, ratio, run_dir)
        none = statistics.median(speed["none"])
        for mode in MODES:
            rate = statistics.median(speed[mode])
            r0 = statistics.median(i[0] for i in idle[mode])
            r1 = statistics.median(i[1] for i in idle[mode])
            print(f"{ratio:5.1f} {mode:>8} {rate:10,.0f} {rate / none:7.2f} {(ratio + 1) / 2:6.2f} "
                  f"{r0:8.0%} {r1:8.0%}")  # fmt: skip


def rows(quick: bool = False) -> list[dict]:
    """Balanced against unbalanced throughput, rank 1 at half speed, simulated work (steady under load;
    ideal 1.5x; ``quick``: 1 repetition of 40 steps)."""
    reps, steps, steady = (1, 40, 20) if quick else (3, 60, 20)
    opts = argparse.Namespace(reps=reps, steps=steps, steady=steady, hidden=64, batch=64, sample_work_ms=0.2)
    with tempfile.TemporaryDirectory() as run_dir:
        speed, _ = data_runs(opts, 2.0, run_dir)
    none = statistics.median(speed["none"])
    return [
        row(
            f"data, rank 1 at half speed, balance={mode} (samples/s)",
            statistics.median(speed[mode]),
            none,
            "balance=none",
            ">= 1.25",  # notebook 08's claim
        )
        for mode in ("static", "dynamic")
    ]


def pipeline(opts: argparse.Namespace, run_dir: str) -> None:
    lm = ddlkit.RunConfig(strategy="pipeline", world_size=2, pp=2, model="lm", dataset="sonnets", seq_len=512,
                          hidden=16, batch_size=4, micro_batches=2, steps=8, device="cpu", run_dir=run_dir)  # fmt: skip
    times: dict[str, list[float]] = {"parameters": [], "auto": []}
    report = {}
    for _ in range(opts.reps):
        for name, cuts in (("parameters", None), ("auto", "auto")):
            run = ddlkit.launch(lm.replace(cut_points=cuts), echo=False).wait(600)
            rows = run.metrics[run.metrics["step"] >= 2]
            times[name].append(float(rows.groupby("step")["step_time"].max().median()))
            report = next((e for e in run.events if e["type"] == "cuts"), report)
    print("\npipeline, LM seq_len 512 hidden 16, 2 stages, 1f1b, 2 micro-batches")
    print(f"{'cuts':>10} {'at':>5} {'slowest stage (profiled)':>25} {'step time':>10} {'x params':>9}")
    base = statistics.median(times["parameters"])
    for name, cut_key, stage_key in (("parameters", "param_cuts", "param_stage_s"), ("auto", "cuts", "stage_s")):
        step = statistics.median(times[name])
        print(f"{name:>10} {str(report[cut_key]):>5} {max(report[stage_key]) * 1e3:22.1f} ms {step * 1e3:7.0f} ms "
              f"{step / base:9.2f}")  # fmt: skip


def timing_cost(opts: argparse.Namespace, run_dir: str) -> None:
    base = ddlkit.RunConfig(strategy="data", world_size=2, model="mlp", dataset="digits", hidden=128, batch_size=32,
                            steps=opts.steps * 4, device="cpu", run_dir=run_dir)  # fmt: skip
    step: dict[str, list[float]] = {"every step sampled": [], "none sampled": []}
    for _ in range(opts.reps):
        for name, every in (("every step sampled", 1), ("none sampled", 10**6)):
            run = ddlkit.launch(base.replace(time_every=every), echo=False).wait(600)
            rows = run.metrics[run.metrics["step"] >= 5]
            step[name].append(float(rows.groupby("step")["step_time"].max().median()))
    sampled, unsampled = (statistics.median(step[k]) for k in step)
    print("\ncomm timing cost, 2 ranks, MLP hidden 128, batch 32 (a small step: the cost shows)")
    print(f"step time, none sampled: {unsampled * 1e3:.3f} ms; every step sampled: {sampled * 1e3:.3f} ms "
          f"(+{(sampled - unsampled) * 1e6:.0f} us a sampled step; at time_every=20: "
          f"+{(sampled - unsampled) / 20 / unsampled * 100:.1f} % a step on average)")  # fmt: skip
    print(f"hook on an unsampled step, in-process: +{hook_overhead_us():.2f} us a bucket over the bare hook")


def hook_overhead_us(calls: int = 200_000) -> float:
    """The wrapper's own cost on an unsampled step (first bucket: the straggler check, two clock reads)."""
    done: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    done.set_result(torch.zeros(1))
    inner = lambda state, bucket: done  # noqa: E731
    timer = CommTimer(inner)
    start = time.perf_counter()
    for _ in range(calls):
        inner(None, None)
    bare = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(calls):
        timer.start(False)
        timer.hook(None, None)  # type: ignore[arg-type]
    wrapped = time.perf_counter() - start
    return (wrapped - bare) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--steady", type=int, default=20)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--sample-work-ms", type=float, default=0.0, help="simulated compute per sample (a sleep)")
    parser.add_argument("--only", choices=("data", "pipeline", "timing"), default=None)
    opts = parser.parse_args()
    run_dir = tempfile.mkdtemp()
    for name, part in (("data", data_parallel), ("pipeline", pipeline), ("timing", timing_cost)):
        if opts.only in (None, name):
            part(opts, run_dir)


if __name__ == "__main__":
    main()
