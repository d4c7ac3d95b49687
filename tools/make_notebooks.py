"""Write the tutorial notebooks from the cell sources below (no outputs).

Edit a notebook here, run `python tools/make_notebooks.py`, commit both.
"""
from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def write(name: str, cells: list[tuple[str, str]]) -> None:
    nb = new_notebook(cells=[new_markdown_cell(src) if kind == "md" else new_code_cell(src) for kind, src in cells])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, NOTEBOOKS / name)


DATA_PARALLEL = [
    ("md", """# 01 · Data parallelism is large-batch training

**The fact.** In data parallelism every rank holds the whole model and takes its
own share of each global batch. After the backward pass the ranks average their
gradients (an *all-reduce*), so every rank applies the same update. With
`N` ranks of batch `B` the averaged gradient is the gradient of the mean loss
over all `N·B` samples: the run is, step for step, **one process training with
batch `N·B`**. Parallelism changes how fast the work is done, not what is
computed.

We check it: two ranks of batch 16 against one process of batch 32, on the same
samples in the same order, plain SGD, same seed."""),
    ("code", """import ddlkit

base = ddlkit.RunConfig(model="mlp", dataset="digits", steps=40, lr=0.1, optimizer="sgd", seed=0, device="cpu")
two_ranks = ddlkit.launch(base.replace(strategy="data", world_size=2, batch_size=16), echo=False)
one_big_batch = ddlkit.launch(base.replace(strategy="single", world_size=1, batch_size=32), echo=False)
two_ranks.status, one_big_batch.status   # both returned at once and train in the background"""),
    ("md", """While they train the notebook is free. `run.metrics` is a table that grows
as the ranks report. Now wait for both (a run must end before we assert on it)."""),
    ("code", """two_ranks.wait(timeout=300)
one_big_batch.wait(timeout=300)
two_ranks.metrics.head()"""),
    ("md", """Each rank logged its own loss on its own 16 samples; their mean is the loss of
the 32-sample batch. The weights at the end are what matter:"""),
    ("code", """data_weights = two_ranks.result().state_dict
single_weights = one_big_batch.result().state_dict
max_difference = max((data_weights[k] - single_weights[k]).abs().max().item() for k in data_weights)
print(f"largest difference between any two weights: {max_difference:.2e}")
assert max_difference < 1e-5"""),
    ("md", """Agreement to float32 rounding. Is that because training barely moved the
weights? A single process with batch **16** (the per-rank batch, not the global
one) ends somewhere else entirely:"""),
    ("code", """small_batch = ddlkit.launch(base.replace(strategy="single", world_size=1, batch_size=16), echo=False).wait(300)
small_weights = small_batch.result().state_dict
other_difference = max((small_weights[k] - single_weights[k]).abs().max().item() for k in small_weights)
print(f"batch 16 vs batch 32: {other_difference:.2e}")
assert other_difference > 1000 * max_difference"""),
    ("md", """The price of the equivalence is communication: every step each rank waits for
the all-reduce. The workers timed it:"""),
    ("code", """timing = two_ranks.metrics.groupby("rank")[["compute_s", "comm_s"]].mean() * 1000
print(timing.round(3).rename(columns=lambda c: c.replace("_s", " ms")))
assert (two_ranks.metrics["comm_s"] > 0).all()
mean_loss = two_ranks.metrics.groupby("step")["loss"].mean()
single_loss = one_big_batch.metrics.set_index("step")["loss"]
print(f"mean over ranks vs single-process loss, largest gap: {(mean_loss - single_loss).abs().max():.2e}")
assert (mean_loss - single_loss).abs().max() < 1e-4"""),
]


MODEL_PARALLEL = [
    ("md", """# 02 · Model parallelism: pipelines have bubbles, tensor shards are exact

**The facts.** When a model is split into `p` pipeline stages and each step's
batch into `m` micro-batches, the stages cannot all be busy all the time: the
last stage waits for the first micro-batch to arrive, the first waits for the
last gradient to come back. With equal stages (GPipe schedule) the idle
fraction, the *bubble*, is **(p-1)/(m+p-1)**. More micro-batches, smaller
bubble. The 1F1B schedule has the same bubble but starts backwards early, so
each stage keeps fewer micro-batches of activations alive. And none of this
changes the arithmetic: a pipeline step equals a single-process step.

Tiny models on a CPU compute in microseconds and their timeline is noise, so
these runs use teaching mode: `stage_delay=0.02` makes every forward sleep
20 ms and every backward 40 ms, standing in for real work. What we measure is
the schedule's shape."""),
    ("code", """import ddlkit
from ddlkit import timeline

base = ddlkit.RunConfig(model="mlp", dataset="digits", hidden=32, steps=4, batch_size=16, lr=0.1,
                        optimizer="sgd", seed=0, device="cpu")
pipe = base.replace(strategy="pipeline", world_size=2, pp=2, micro_batches=4, stage_delay=0.02)
gpipe = ddlkit.launch(pipe.replace(schedule="gpipe"), echo=False)
one_f_one_b = ddlkit.launch(pipe.replace(schedule="1f1b"), echo=False)
single = ddlkit.launch(base.replace(strategy="single", world_size=1), echo=False)
for run in (gpipe, one_f_one_b, single):
    run.wait(timeout=300)"""),
    ("md", """Each stage recorded a span per micro-batch and phase. The timeline of the
last two steps (one row per stage): forward in blue, backward in orange, the
bubble is the white space."""),
    ("code", """timeline.figure(gpipe)"""),
    ("md", """Measured bubble: for each step, a rank's idle share of the window from the
first span's start to the last span's end (any rank), averaged over steps
after the first. Theory beside it."""),
    ("code", """bubbles = timeline.bubbles(gpipe)
print(bubbles.round(3))
assert (bubbles["measured"] - bubbles["theory"]).abs().max() < 0.05"""),
    ("md", """GPipe runs all four forwards before any backward; 1F1B starts the backward of
micro-batch 0 as soon as the last stage has it. How many micro-batches each
stage held in flight (forward done, backward not yet):"""),
    ("code", """held = {name: timeline.in_flight(run).set_index("stage")["max_in_flight"]
        for name, run in (("gpipe", gpipe), ("1f1b", one_f_one_b))}
print(held)
assert held["gpipe"][0] == 4 and held["1f1b"][0] == 2
print("bubble 1f1b:", round(timeline.bubble_fraction(one_f_one_b), 3), "gpipe:", round(timeline.bubble_fraction(gpipe), 3))"""),
    ("md", """And the pipeline computed exactly what one process computes on the same
16-sample batches: the loss of each micro-batch is a mean and the schedule
divides the summed gradients by `m`."""),
    ("code", """def largest_difference(a, b):
    assert list(a) == list(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)

reference = single.result().state_dict
pipeline_gap = largest_difference(gpipe.result().state_dict, reference)
print(f"pipeline vs single process: {pipeline_gap:.1e}")
assert pipeline_gap < 1e-5"""),
    ("md", """## Tensor parallelism

Megatron-style: in every block, `q, k, v` and the MLP's `up` are cut by output
columns, `o` and `down` by input rows, so each rank holds half of every big
matrix and each pair needs one all-reduce. Both ranks see the same batch. The
sharded weights are DTensors; the result gathers them back under the
single-process names."""),
    ("code", """lm = base.replace(model="lm", dataset="sonnets", seq_len=16, hidden=32)
tensor = ddlkit.launch(lm.replace(strategy="tensor", world_size=2, tp=2), echo=False).wait(300)
lm_single = ddlkit.launch(lm.replace(strategy="single", world_size=1), echo=False).wait(300)
tensor_gap = largest_difference(tensor.result().state_dict, lm_single.result().state_dict)
print(f"tensor parallel vs single process: {tensor_gap:.1e}")
assert tensor_gap < 1e-5"""),
    ("md", """Each rank stores only its shards (plus the small replicated norms and
embeddings), as its memory event shows:"""),
    ("code", """shards = timeline.memory_table(tensor).set_index("rank")
whole = timeline.memory_table(lm_single).set_index("rank")
print(shards[["param_bytes", "peak_activation_bytes"]], whole[["param_bytes"]], sep="\\n")
assert (shards["param_bytes"] < 0.75 * whole["param_bytes"][0]).all()"""),
]

HYBRID = [
    ("md", """# 03 · Hybrids on a 2-D mesh, and FSDP's memory

**The facts.** Parallelisms compose on a grid of ranks, a *device mesh*. With
4 ranks as `dp=2 x pp=2`, each row is one pipeline (a model replica), each
column holds the same stage and averages its gradients. `dp=2 x tp=2` is the
same with tensor shards. Either way a step is still exactly one
single-process step on the global batch. And FSDP, data parallelism in which
each rank keeps only a shard of parameters, gradients and optimizer state,
stores about **1/N** of them per rank: we measure it against DDP."""),
    ("code", """import ddlkit
from ddlkit import timeline

base = ddlkit.RunConfig(model="mlp", dataset="digits", hidden=32, steps=4, lr=0.1, optimizer="sgd",
                        seed=0, device="cpu")
dp_pp = ddlkit.launch(base.replace(strategy="hybrid", world_size=4, dp=2, pp=2, micro_batches=2, batch_size=8),
                      echo=False).wait(300)
dp_tp = ddlkit.launch(base.replace(strategy="hybrid", world_size=4, dp=2, tp=2, batch_size=8), echo=False).wait(300)
single = ddlkit.launch(base.replace(strategy="single", world_size=1, batch_size=16), echo=False).wait(300)"""),
    ("md", """Two replicas of batch 8 against one process of batch 16:"""),
    ("code", """def largest_difference(a, b):
    assert list(a) == list(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)

for name, run in (("dp x pp", dp_pp), ("dp x tp", dp_tp)):
    gap = largest_difference(run.result().state_dict, single.result().state_dict)
    print(f"{name} vs single process: {gap:.1e}")
    assert gap < 1e-5"""),
    ("md", """The dp x pp run's pipeline timeline, both replicas' stages on one chart
(stage 0 is on ranks 0 and 2):"""),
    ("code", """timeline.figure(dp_pp)"""),
    ("md", """## FSDP against DDP

Same model, two ranks, Adam (two moment buffers per parameter). Each rank
measured its own bytes during one step (`memory` events: parameters the
optimizer updates, their gradients, optimizer state, peak saved activations)."""),
    ("code", """import plotly.graph_objects as go

adam = base.replace(world_size=2, batch_size=16, optimizer="adam", lr=3e-3, hidden=64)
ddp = ddlkit.launch(adam.replace(strategy="data"), echo=False).wait(300)
fsdp = ddlkit.launch(adam.replace(strategy="fsdp"), echo=False).wait(300)
memory = {name: timeline.memory_table(run).set_index("rank") for name, run in (("ddp", ddp), ("fsdp", fsdp))}
print(memory["ddp"], memory["fsdp"], sep="\\n")
kept = {name: table["param_bytes"] + table["grad_bytes"] + table["optimizer_bytes"] for name, table in memory.items()}
ratio = kept["fsdp"] / kept["ddp"]
go.Figure(timeline.memory_traces(fsdp), layout=dict(barmode="stack", height=300, yaxis_title="MiB",
                                                   title="FSDP, per rank")).show()
print("FSDP / DDP, parameters + gradients + optimizer state per rank:", ratio.round(3).tolist())
assert ((ratio > 0.45) & (ratio < 0.55)).all()"""),
    ("md", """The price is communication: DDP all-reduces the gradients once; FSDP
all-gathers the parameters for forward and again for backward, then
reduce-scatters the gradients. Payload bytes each rank handed to collectives
in the measured step (`comm` events):"""),
    ("code", """def comm_bytes(run):
    return sum(e["comm_bytes"] for e in run.events if e["type"] == "comm") / run.world_size

print(f"DDP {comm_bytes(ddp) / 1024:.0f} KiB, FSDP {comm_bytes(fsdp) / 1024:.0f} KiB per rank per step")
assert 1.5 < comm_bytes(fsdp) / comm_bytes(ddp) < 2.5"""),
]

if __name__ == "__main__":
    write("01_data_parallel.ipynb", DATA_PARALLEL)
    write("02_model_parallel.ipynb", MODEL_PARALLEL)
    write("03_hybrid.ipynb", HYBRID)
    print("wrote", *sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")), file=sys.stderr)
