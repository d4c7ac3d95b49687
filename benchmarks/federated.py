"""Federated simulation speed: ddlkit against Flower's simulation engine, side by side.

The same experiment in both: 100 clients (IID split of digits' training
samples by ddlkit.partition, so both see the same client data), 10 % sampled
a round, FedAvg with E local epochs of batch 10, SGD lr 0.1, the same MLP,
evaluated on the same held-out fifth after the last round. ddlkit runs
``strategy="federated"`` on 3 processes (a server and 2 client ranks); Flower
runs ``flwr.simulation.run_simulation`` with its Ray backend and 2 CPUs.

Printed: wall seconds end to end (start-up included), rounds per second
while training (from the first round's start to the last round's end), and the
final held-out accuracy of each; the ratio of rounds per second. Accuracy
must agree within noise (both sample their own clients with their own
seeds, so the curves differ round to round).

    python benchmarks/federated.py [--rounds 20] [--epochs 5]

Flower is optional (``pip install -e .[peers]``); without it only ddlkit's
numbers are printed, with a line saying what is missing.
"""

from __future__ import annotations

import argparse
import os
import signal
import time
from pathlib import Path

import torch
from table import row

import ddlkit
from ddlkit import partition
from ddlkit.data import held_out_split, load_dataset, subset
from ddlkit.models import build_model, loss_fn

CLIENTS, FRACTION, BATCH, LR, HIDDEN, SEED = 100, 0.1, 10, 0.1, 64, 0
NOISE = 0.05  # accuracy gap that two runs sampling different clients show after convergence


def config(rounds: int, epochs: int) -> ddlkit.RunConfig:
    return ddlkit.RunConfig(
        strategy="federated", world_size=3, clients=CLIENTS, fraction=FRACTION, rounds=rounds, local_epochs=epochs,
        local_batch=BATCH, lr=LR, hidden=HIDDEN, seed=SEED, eval_every=rounds, device="cpu", run_dir="runs/bench",
    )  # fmt: skip


def run_ddlkit(rounds: int, epochs: int) -> dict[str, float]:
    started = time.perf_counter()
    run = ddlkit.launch(config(rounds, epochs), echo=False).wait(timeout=1800)
    wall = time.perf_counter() - started
    table = ddlkit.federated.rounds_table(run)
    rows = [e for e in run.events if e["type"] == "round"]
    training = rows[-1]["time"] - (rows[0]["time"] - rows[0]["wall_s"])
    accuracy = ddlkit.federated.evals_table(run)["accuracy"].iloc[-1]
    return {"wall_s": wall, "rounds_per_s": len(table) / training, "accuracy": float(accuracy)}


def run_flower(rounds: int, epochs: int) -> dict[str, float]:
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    data, parts = partition.of_config(config(rounds, epochs))
    full = load_dataset("digits")
    test = subset(full, held_out_split(full, SEED)[1])
    stamps: list[float] = []
    accuracy: list[float] = []

    def model() -> torch.nn.Module:
        torch.manual_seed(SEED)
        return build_model("mlp", full, HIDDEN)

    client = ClientApp()

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        net = model()
        net.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        index = parts[int(context.node_config["partition-id"])]
        optimizer = torch.optim.SGD(net.parameters(), lr=LR)
        generator = torch.Generator().manual_seed(len(stamps))
        for _ in range(epochs):
            for batch in index[torch.randperm(len(index), generator=generator)].split(BATCH):
                optimizer.zero_grad()
                loss_fn("classify", net(data.inputs[batch]), data.targets[batch]).backward()
                optimizer.step()
        content = RecordDict(
            {"arrays": ArrayRecord(net.state_dict()), "metrics": MetricRecord({"num-examples": len(index)})}
        )
        return Message(content=content, reply_to=msg)

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        stamps.append(time.perf_counter())
        net = model()
        net.load_state_dict(arrays.to_torch_state_dict())
        with torch.no_grad():
            accuracy.append(float((net(test.inputs).argmax(1) == test.targets).float().mean()))
        return MetricRecord({"accuracy": accuracy[-1]})

    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = FedAvg(fraction_train=FRACTION, fraction_evaluate=0.0, min_available_nodes=CLIENTS)
        strategy.start(grid, ArrayRecord(model().state_dict()), num_rounds=rounds, evaluate_fn=evaluate)

    started = time.perf_counter()
    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 2}}
    run_simulation(server_app=server, client_app=client, num_supernodes=CLIENTS, backend_config=backend)
    wall = time.perf_counter() - started
    wait_for_ray_to_end()
    training = stamps[-1] - stamps[0]  # evaluate_fn runs before the first round and after each
    return {"wall_s": wall, "rounds_per_s": rounds / training, "accuracy": accuracy[-1]}


def ray_processes() -> list[int]:
    """Ray's actors and daemons (their command lines start with 'ray::' or name raylet / gcs_server)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes() if entry.name.isdigit() else b""
        except OSError:
            continue
        if cmdline.startswith(b"ray::") or b"raylet" in cmdline or b"gcs_server" in cmdline:
            found.append(int(entry.name))
    return found


def wait_for_ray_to_end(limit_s: float = 90.0) -> None:
    """Flower shuts Ray down when the simulation ends; its actors take some seconds to exit. Nothing may stay."""
    deadline = time.time() + limit_s
    while ray_processes() and time.time() < deadline:
        time.sleep(0.5)
    for pid in ray_processes():  # still there after the limit: ours, from this simulation
        os.kill(pid, signal.SIGKILL)
        print(f"killed Ray process {pid}, left {limit_s:.0f} s after the simulation ended")


def rows(quick: bool = False) -> list[dict]:
    """Rounds per second against Flower's simulation (``quick``: 5 rounds of 1 epoch); without flwr, ddlkit's alone."""
    rounds, epochs = (5, 1) if quick else (20, 5)
    ours = run_ddlkit(rounds, epochs)
    try:
        import flwr  # noqa: F401
    except ImportError:
        return [row("federated, 100 clients: rounds/s", ours["rounds_per_s"], None, "Flower: not installed (.[peers])")]
    theirs = run_flower(rounds, epochs)
    return [
        row(
            "federated, 100 clients: rounds/s",
            ours["rounds_per_s"],
            theirs["rounds_per_s"],
            "Flower simulation",
            ">= 2.0",
        )
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    results = {"ddlkit": run_ddlkit(args.rounds, args.epochs)}
    try:
        import flwr  # noqa: F401
    except ImportError:
        print("flwr is not installed (pip install -e .[peers]): Flower's side is skipped")
    else:
        results["flower"] = run_flower(args.rounds, args.epochs)
    print(f"{CLIENTS} clients, C={FRACTION}, {args.rounds} rounds, E={args.epochs}, B={BATCH}, mlp hidden {HIDDEN}")
    print(f"{'':8s} {'wall s':>8s} {'rounds/s':>9s} {'accuracy':>9s}")
    for name, r in results.items():
        print(f"{name:8s} {r['wall_s']:8.1f} {r['rounds_per_s']:9.2f} {r['accuracy']:9.3f}")
    if "flower" in results:
        ratio = results["ddlkit"]["rounds_per_s"] / results["flower"]["rounds_per_s"]
        gap = abs(results["ddlkit"]["accuracy"] - results["flower"]["accuracy"])
        print(f"ddlkit / flower rounds per second: {ratio:.1f}x (aim: >= 2x)")
        print(
            f"final accuracy gap {gap:.3f}: {'the same within noise' if gap < NOISE else 'MORE than noise'} "
            f"(noise: {NOISE}, each samples its own clients)"
        )


if __name__ == "__main__":
    main()
