"""Bytes per step and step time of each strategy and compression setting, on
loopback and two emulated networks, with the cost model's prediction beside
each measurement and their ratio.

    python benchmarks/communication.py [--steps 60] [--networks loopback 10gbe 1gbe]

Every run: 2 ranks (the parameter server: 1 server + 2 workers), mlp hidden 512 on digits, 32 samples a
replica, one thread a rank. Step time is the cost model's own measure (``costmodel.step_time``: the lower
quartile over steps >= 5 of the slowest rank's step, what the code costs when the shared machine lets it);
bytes are rank 0's payload handed to the process group per step (the emulated backend's count), over
steps >= 2.
The prediction is ``ddlkit.costmodel.predict`` from one calibration at the start; ``ratio`` is
measured / predicted step time. On a shared machine timings move with its load: compare rows of one run.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import pandas as pd
from table import row

import ddlkit
from ddlkit import costmodel
from ddlkit.scaling import CLUSTERS, Calibration

SETTINGS = {
    "data": dict(strategy="data"),
    "data fp16": dict(strategy="data", compression="fp16"),
    "data powersgd r2": dict(strategy="data", compression="powersgd", powersgd_rank=2),
    "data topk 1%": dict(strategy="data", compression="topk", topk_ratio=0.01),
    "data accumulate 4": dict(strategy="data", grad_accumulation=4),
    "local_sgd H=10": dict(strategy="local_sgd", sync_every=10),
    "ps bsp": dict(strategy="ps", world_size=3, sync="bsp"),
    "pipeline m=4": dict(strategy="pipeline", pp=2, micro_batches=4),
}


def measure(cfg: ddlkit.RunConfig) -> tuple[float, float]:
    run = ddlkit.launch(cfg, echo=False).wait(timeout=600)
    rows = run.metrics
    mine = rows[(rows["rank"] == rows["rank"].min()) & (rows["step"] >= 2)]
    if cfg.strategy == "ps":  # rank 0 serves; its first worker's bytes
        mine = rows[(rows["rank"] == 1) & (rows["step"] >= 2)]
    return costmodel.step_time(run), float(mine["comm_bytes"].mean())


def against_model(base: ddlkit.RunConfig, cal: Calibration, label: str, network: str) -> dict:
    """One setting on one network: measured bytes and step time, the cost model's step time, their ratio."""
    setting = SETTINGS[label]
    cfg = base.for_strategy(setting["strategy"]).replace(**setting, network=network)
    step_s, bytes_per_step = measure(cfg)
    predicted = costmodel.predict(cfg, [cfg.world_size], network=network, calibration=cal, batch="per_rank")
    return {
        "setting": label,
        "network": network,
        "KB/step": bytes_per_step / 1e3,
        "step ms": step_s * 1e3,
        "predicted ms": predicted["step_s"].iloc[0] * 1e3,
        "ratio": step_s / predicted["step_s"].iloc[0],
    }


def rows(quick: bool = False) -> list[dict]:
    """``data`` on loopback and an emulated 1 GbE: measured step time against the cost model's
    prediction (``quick``: 12 steps, else 60)."""
    base = ddlkit.RunConfig(world_size=2, model="mlp", hidden=512, batch_size=32, steps=12 if quick else 60,
                            threads=1, device="cpu", run_dir=tempfile.mkdtemp(prefix="ddlkit-bench-"))  # fmt: skip
    cal = costmodel.calibrate(base)
    out = []
    for network in ("loopback", "1gbe"):
        measured = against_model(base, cal, "data", network)
        out.append(row(f"data step time on {network} (ms)", measured["step ms"], measured["predicted ms"],
                       "ddlkit.costmodel's prediction", "<= 1.2"))  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--networks", nargs="+", default=["loopback", "10gbe", "1gbe"])
    opts = parser.parse_args()
    runs_dir = tempfile.mkdtemp(prefix="ddlkit-bench-")
    base = ddlkit.RunConfig(
        world_size=2, model="mlp", hidden=512, batch_size=32, steps=opts.steps, threads=1, device="cpu"
    ).replace(run_dir=runs_dir)
    started = time.perf_counter()
    cal = costmodel.calibrate(base)
    print(
        f"calibrated in {time.perf_counter() - started:.0f} s: loopback all-reduce alpha "
        f"{cal.allreduce_latency_s * 1e6:.0f} us, {cal.allreduce_bandwidth_Bps / 1e9:.2f} GB/s; "
        f"compute {cal.per_sample_s * 1e6:.1f} us/sample + {cal.overhead_s * 1e3:.2f} ms/step"
    )
    rows = []
    for label in SETTINGS:
        for network in opts.networks:
            rows.append(against_model(base, cal, label, network))
            print(pd.DataFrame(rows[-1:]).to_string(index=False, header=len(rows) == 1, float_format="%.2f"))
    table = pd.DataFrame(rows)
    print()
    print(table.to_string(index=False, float_format="%.2f"))
    print(
        f"\nmedian ratio measured/predicted: {table['ratio'].median():.2f}; "
        f"within 20 %: {((table['ratio'] - 1).abs() <= 0.2).sum()} of {len(table)}"
    )
    data = base.for_strategy("data")
    where = {
        name: costmodel.best_world_size(data, network=name, calibration=cal, emulated=False)
        for name in ("1gbe", "10gbe", "nvlink")
    }
    where |= {f"cluster {name}": costmodel.best_world_size(data, calibration=cal, cluster=name) for name in CLUSTERS}
    print("best world size for data, global batch 64 (beyond it < 5 % more throughput):", where)


if __name__ == "__main__":
    main()
