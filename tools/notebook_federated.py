"""The cells of notebooks/06_federated.ipynb (written by tools/make_notebooks.py)."""

FEDERATED = [
    (
        "md",
        """# 06 · Federated learning: local work saves rounds

**The fact** (McMahan et al. 2017): when devices keep their data and only
model updates travel, each *communication round* is what costs. Letting every
sampled client run several local epochs on its own data (FedAvg, E=5, B=10)
before averaging reaches a target accuracy in far fewer rounds than averaging
one gradient per client per round (FedSGD, E=1, B=all), even when every
client holds only two digits.

Here 100 virtual clients are multiplexed over 3 processes: rank 0 is the
server, ranks 1 and 2 train whichever clients the server samples (C = 10 %
a round). A held-out fifth of digits, which no client holds, measures the
global model after every round (`eval_every=1`).""",
    ),
    (
        "code",
        """import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go

import ddlkit
from ddlkit import partition

base = ddlkit.RunConfig(strategy="federated", world_size=3, clients=100, fraction=0.1, model="mlp", hidden=64,
                        dataset="digits", eval_every=1, device="cpu", seed=0)
splits = {"IID": dict(partition="iid"), "Dirichlet α=0.1": dict(partition="dirichlet", alpha=0.1),
          "2 shards per client": dict(partition="shards", shards_per_client=2)}
tables = {}
for name, split in splits.items():
    data, parts = partition.of_config(base.replace(**split))
    tables[name] = partition.label_table(data.targets, parts)
    labels = np.count_nonzero(tables[name], axis=1)
    print(f"{name:20s} label skew {partition.skew(tables[name]):.2f}, labels per client {labels.mean():.1f}")
skews = [partition.skew(t) for t in tables.values()]
assert skews[0] < skews[1] < skews[2]  # more and more non-IID (IID is not 0: 14 samples a client vary by chance)
assert (np.count_nonzero(tables["2 shards per client"], axis=1) == 2).all()  # McMahan's pathological split
go.Figure(go.Heatmap(z=tables["2 shards per client"].T, colorscale="Blues"),
          layout=dict(title="2 shards per client: training samples per client (x) and digit (y)",
                      xaxis_title="client", yaxis_title="digit", height=320))""",
    ),
    (
        "md",
        """## FedSGD against FedAvg, IID and pathological non-IID

Four runs at once, in the background; the dashboard overlays their held-out
accuracy round by round while they train. Learning rates were picked per
setting by a small sweep run once beforehand (FedSGD from 0.3, 0.5, 0.6, 1.0;
FedAvg from 0.05 to 0.4), each the fastest to 80 %: both sides get their best.""",
    ),
    (
        "code",
        """settings = {
    ("FedSGD", "IID"): dict(partition="iid", local_epochs=1, local_batch=None, lr=0.6, rounds=70),
    ("FedAvg", "IID"): dict(partition="iid", local_epochs=5, local_batch=10, lr=0.3, rounds=25),
    ("FedSGD", "non-IID"): dict(partition="shards", local_epochs=1, local_batch=None, lr=0.3, rounds=70),
    ("FedAvg", "non-IID"): dict(partition="shards", local_epochs=5, local_batch=10, lr=0.4, rounds=25),
}
runs = {key: ddlkit.launch(base.replace(**changes), echo=False) for key, changes in settings.items()}
dashboard = ddlkit.Dashboard(list(runs.values()))
dashboard""",
    ),
    (
        "code",
        """for run in runs.values():
    run.wait(timeout=900)
TARGET = 0.8
reached = {key: ddlkit.federated.rounds_to(run, TARGET) or math.inf for key, run in runs.items()}
table = pd.Series(reached).unstack(0)[["FedSGD", "FedAvg"]]
table["FedSGD / FedAvg"] = table["FedSGD"] / table["FedAvg"]
print(f"rounds to {TARGET:.0%} held-out accuracy:")
print(table.to_string())
assert (table["FedSGD / FedAvg"] >= 3).all()   # at least 3x fewer rounds, IID and non-IID
ddlkit.federated.figure({f"{a} {d}": run for (a, d), run in runs.items()})""",
    ),
    (
        "md",
        """Local epochs cost compute on the device, not communication: FedAvg
trains ~35 samples' worth per client per round where FedSGD takes one
gradient, and turns that into fewer rounds. On the pathological split every
client pulls the model toward its two digits; averaging still converges, more
slowly than IID.

## Edge devices: FedProx keeps the slow devices' work

Real clients differ: here `devices="edge"` draws each client's compute speed
and link (a log-normal spread, and a slow quarter 4-10x slower). With a tight
0.25 s (simulated) round deadline most clients cannot finish five local
epochs in time. FedAvg drops every late client, round after round mostly the
same slow ones, and learns from the few fast ones; FedProx (Li et al. 2020)
takes the partial work a late client managed by the deadline, and its
proximal term (`mu`) keeps those local steps close to the global model.
20 clients a round here, for a steadier comparison.""",
    ),
    (
        "code",
        """edge = base.replace(partition="shards", fraction=0.2, local_epochs=5, local_batch=10, lr=0.4, rounds=25,
                    devices="edge", deadline_s=0.25)
fedavg = ddlkit.launch(edge, echo=False)
fedprox = ddlkit.launch(edge.replace(algorithm="fedprox", mu=0.1), echo=False)
for run in (fedavg, fedprox):
    run.wait(timeout=900)
rows = {}
for name, run in {"FedAvg, late clients dropped": fedavg, "FedProx, partial work": fedprox}.items():
    rounds, evals = ddlkit.federated.rounds_table(run), ddlkit.federated.evals_table(run)
    rows[name] = {"completed": rounds["completed"].sum(), "partial": rounds["partial"].sum(),
                  "dropped": rounds["dropped"].sum(), "simulated s": rounds["sim_s"].sum().round(1),
                  "accuracy, last 10 rounds": evals["accuracy"].iloc[-10:].mean().round(3)}
comparison = pd.DataFrame(rows).T
print(comparison.to_string())
accuracy = comparison["accuracy, last 10 rounds"]
assert comparison.loc["FedProx, partial work", "partial"] > 0
assert comparison.loc["FedProx, partial work", "dropped"] < comparison.loc["FedAvg, late clients dropped", "dropped"]
assert accuracy["FedProx, partial work"] > accuracy["FedAvg, late clients dropped"] + 0.05""",
    ),
    (
        "md",
        """## Secure aggregation: the server learns the sum, only the sum

With `secure_aggregation=True` every client adds pairwise masks (Bonawitz et
al. 2017) to its update, as fixed-point integers; the masks cancel in the sum
exactly, also when clients drop mid-round (the survivors reveal their masks
with the dropped ones). The server process only ever holds masked updates.
Same run with and without it, 30 % of clients vanishing each round:""",
    ),
    (
        "code",
        """import torch

from ddlkit import secagg

drops = base.replace(rounds=5, local_epochs=2, dropout=0.3, fraction=0.2)
plain = ddlkit.launch(drops, echo=False).wait(timeout=600)
secure = ddlkit.launch(drops.replace(secure_aggregation=True), echo=False).wait(timeout=600)
a, b = plain.result().state_dict, secure.result().state_dict
gap = max((a[k] - b[k]).abs().max().item() for k in a)
print(f"largest weight difference, secure vs plain aggregation: {gap:.1e}")
assert gap < 1e-6

# what the server receives from one client: its update plus masks shared with the round's other clients
update = torch.cat([(b[k] - a[k] + 0.01 * torch.randn_like(a[k])).flatten() for k in a]).double()
masked = secagg.decode(secagg.masked(update, client=3, peers=[3, 17, 42], secret=b"clients only", round_=0))
correlation = np.corrcoef(masked.numpy(), update.numpy())[0, 1]
print(f"correlation of one masked update with the true one: {correlation:+.3f}")
assert abs(correlation) < 0.05""",
    ),
    (
        "md",
        """## Differential privacy: accuracy for epsilon

DP-FedAvg (McMahan et al. 2018): each client's update is clipped to norm
`dp_clip`, the server adds Gaussian noise `dp_noise_multiplier × dp_clip` to
the sum; clients are Poisson-sampled so that opacus's RDP accountant can say
how much privacy the rounds spent: epsilon at delta = 1e-5, per round. More
noise, less privacy spent. A little noise costs nothing here (clipped, noisy
updates even match the noise-free run), a lot of it costs accuracy.""",
    ),
    (
        "code",
        """private = base.replace(fraction=0.5, rounds=15, local_epochs=1, lr=0.4, dp_clip=1.0)
levels = [0.0, 1.0, 4.0]
dp_runs = {z: ddlkit.launch(private.replace(dp_noise_multiplier=z), echo=False) for z in levels}
rows = []
for z, run in dp_runs.items():
    run.wait(timeout=900)
    rounds, evals = ddlkit.federated.rounds_table(run), ddlkit.federated.evals_table(run)
    epsilon = rounds["epsilon"].iloc[-1] if "epsilon" in rounds else math.inf
    rows.append({"noise multiplier": z, "epsilon": epsilon, "accuracy": evals["accuracy"].iloc[-5:].mean()})
privacy = pd.DataFrame(rows).set_index("noise multiplier")
print(privacy.round(3).to_string())
assert privacy["epsilon"].is_monotonic_decreasing                # more noise, less privacy spent
assert privacy.loc[4.0, "accuracy"] < privacy.loc[0.0, "accuracy"] - 0.1  # and, past a point, less accuracy
assert privacy.loc[1.0, "accuracy"] > privacy.loc[4.0, "accuracy"]""",
    ),
]
