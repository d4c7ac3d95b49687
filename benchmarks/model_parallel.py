"""Model-parallel strategies against ``data`` on the same model, side by side
in one run: step time and communication volume per step.

- Step time: the median over steps after the first 3 of the slowest rank's
  ``step_time`` (``step`` events).
- Communication: the payload bytes each rank handed to collectives and sends
  in one measured step (the ``comm`` event, counted by ``ddlkit.comm``:
  every ``torch.distributed`` op goes through the dispatcher, inputs counted,
  receives not), averaged over ranks. Wire bytes depend on the algorithm.

Each strategy is compared with ``data`` at the same number of ranks (2 for
pipeline, tensor and fsdp, 4 for the hybrids), the same model, the same global
batch and the same steps. Runs alternate per repetition; medians are shown.
On a shared 2-core CPU the step times are noisy and 4-rank runs oversubscribe
the cores: the communication column is exact, the time column is indicative.

Then every pipeline schedule torch ships, at p = 2 and 4 on the cnn (its
10 layers cut into 2p stages where a schedule holds two per rank), m = 8, in
teaching mode (F, I and W sleep ``--stage-delay`` each): the measured bubble
(mean over ranks of the median over steps after the first) beside its
formula (``timeline.theory``), the step time, and the peak activation bytes
a rank kept. Teaching mode sleeps the full cost per stage chunk, so a rank
holding two stages sleeps twice as long per step as with one: compare step
times within a stages/rank group only. Sleeps wake late when the 2 cores are
loaded (4 ranks oversubscribe them): the bubble column is indicative there,
the tests (tests/test_schedules.py) pin measured against theory at p=2.

    python benchmarks/model_parallel.py [--reps 2] [--steps 30] [--model lm] [--hidden 128] [--only schedules]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

import pandas as pd
from table import row

import ddlkit
from ddlkit import timeline
from ddlkit.strategies.schedules import SCHEDULES

LAYOUTS = {  # name -> (RunConfig changes, ranks); batch_size is per data-parallel replica
    "pipeline gpipe": (dict(strategy="pipeline", pp=2, schedule="gpipe", micro_batches=4), 2),
    "pipeline 1f1b": (dict(strategy="pipeline", pp=2, schedule="1f1b", micro_batches=4), 2),
    "pipeline interleaved": (dict(strategy="pipeline", pp=2, schedule="interleaved", micro_batches=4), 2),
    "tensor": (dict(strategy="tensor", tp=2), 2),
    "fsdp": (dict(strategy="fsdp"), 2),
    "hybrid dp2 x pp2": (dict(strategy="hybrid", dp=2, pp=2, micro_batches=4), 4),
    "hybrid dp2 x tp2": (dict(strategy="hybrid", dp=2, tp=2), 4),
}


def measure(cfg: ddlkit.RunConfig) -> tuple[float, float]:
    run = ddlkit.launch(cfg, echo=False).wait(900)
    table = run.metrics
    step_time = float(table[table["step"] >= 3].groupby("step")["step_time"].max().median())
    comm = [e["comm_bytes"] for e in run.events if e.get("type") == "comm"]
    return step_time, sum(comm) / len(comm)


def schedules_table(runs: str, pp: int, delay: float, steps: int) -> pd.DataFrame:
    """Every schedule at ``pp`` ranks, one run each, one after the other."""
    base = ddlkit.RunConfig(
        strategy="pipeline",
        model="cnn",
        dataset="digits",
        hidden=64,
        steps=steps,
        batch_size=32,
        lr=0.1,
        optimizer="sgd",
        device="cpu",
        run_dir=runs,
        world_size=pp,
        pp=pp,
        micro_batches=8,
        stage_delay=delay,
        stage_costs=[1, 1, 1],
        oversubscribe=pp > 2,
    )
    rows = []
    for name in SCHEDULES:
        run = ddlkit.launch(base.replace(schedule=name), echo=False).wait(900)
        bubbles = timeline.bubbles(run)
        table = run.metrics
        rows.append(
            {
                "schedule": name,
                "p": pp,
                "stages/rank": SCHEDULES[name].stages_per_rank,
                "bubble": bubbles["measured"].mean(),
                "theory": bubbles["theory"].iloc[0],
                "step ms": 1000 * float(table[table["step"] >= 1].groupby("step")["step_time"].max().median()),
                "peak act KiB": timeline.memory_table(run)["peak_activation_bytes"].max() / 1024,
            }
        )
    return pd.DataFrame(rows)


def against_data(base: ddlkit.RunConfig, name: str, batch_size: int, reps: int) -> tuple[float, float, float, float]:
    """Step time and comm bytes per step of layout ``name`` and of ``data`` at the same ranks and
    global batch (medians of ``reps`` alternating runs): (step, data step, comm, data comm)."""
    changes, ranks = LAYOUTS[name]
    replicas = changes.get("dp", ranks if changes["strategy"] == "fsdp" else 1)
    cfg = base.replace(world_size=ranks, batch_size=batch_size // replicas, **changes)
    anchor = base.replace(strategy="data", world_size=ranks, batch_size=batch_size // ranks)
    times, anchor_times = [], []
    for _ in range(reps):
        times.append(measure(cfg))
        anchor_times.append(measure(anchor))
    med = statistics.median
    return (
        med(t for t, _ in times),
        med(t for t, _ in anchor_times),
        med(c for _, c in times),
        med(c for _, c in anchor_times),
    )


def rows(quick: bool = False) -> list[dict]:
    """Communication and step time of the 2-rank model-parallel layouts against ``data``
    (lm hidden 128; ``quick``: 1 repetition of 8 steps, else 2 of 30)."""
    reps, steps = (1, 8) if quick else (2, 30)
    out = []
    with tempfile.TemporaryDirectory() as runs:
        base = ddlkit.RunConfig(model="lm", dataset="sonnets", hidden=128, steps=steps, lr=1e-3, optimizer="adam",
                                device="cpu", run_dir=runs, seq_len=32)  # fmt: skip
        for name in ("pipeline 1f1b", "tensor", "fsdp"):
            step, data_step, comm, data_comm = against_data(base, name, 32, reps)
            anchor = "data, same model, ranks and batch"
            out.append(row(f"{name}: comm per step (KiB)", comm / 1024, data_comm / 1024, anchor))
            out.append(row(f"{name}: step time (ms)", step * 1e3, data_step * 1e3, anchor))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--model", default="lm", choices=["mlp", "lm"])
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32, help="global batch per model replica")
    parser.add_argument("--stage-delay", type=float, default=0.05, help="schedules table: seconds per F, I, W")
    parser.add_argument("--only", choices=["strategies", "schedules"], help="print one of the two tables")
    opts = parser.parse_args()
    if opts.only != "strategies":
        with tempfile.TemporaryDirectory() as runs:
            tables = [schedules_table(runs, pp, opts.stage_delay, 6) for pp in (2, 4)]
        print(f"every pipeline schedule, cnn, m=8, F = I = W = {opts.stage_delay * 1000:.0f} ms (teaching mode)")
        print(pd.concat(tables).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if opts.only == "schedules":
        return
    dataset = "sonnets" if opts.model == "lm" else "digits"
    table = []
    with tempfile.TemporaryDirectory() as runs:
        base = ddlkit.RunConfig(
            model=opts.model,
            dataset=dataset,
            hidden=opts.hidden,
            steps=opts.steps,
            lr=1e-3,
            optimizer="adam",
            device="cpu",
            run_dir=runs,
            seq_len=32,
        )
        for name in LAYOUTS:
            step, data_step, comm, data_comm = against_data(base, name, opts.batch_size, opts.reps)
            table.append(
                {
                    "strategy": name,
                    "ranks": LAYOUTS[name][1],
                    "step ms": 1000 * step,
                    "data step ms": 1000 * data_step,
                    "time vs data": step / data_step,
                    "comm KiB/step": comm / 1024,
                    "data comm KiB/step": data_comm / 1024,
                    "comm vs data": comm / data_comm,
                }
            )
    print(
        f"model={opts.model} hidden={opts.hidden}, global batch {opts.batch_size}, {opts.steps} steps, "
        f"median of {opts.reps} (shared CPU: times are noisy)"
    )
    print(pd.DataFrame(table).to_string(index=False, float_format=lambda v: f"{v:.2f}"))


if __name__ == "__main__":
    main()
