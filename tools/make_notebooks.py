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

FAULT_TOLERANCE = [
    ("md", """# 05 · A killed worker costs at most one checkpoint interval

**The fact.** Distributed training is many processes that must all survive:
when one dies, its peers block in their next all-reduce. ddlkit does what
`torchrun --max-restarts` does: it ends every rank and starts them all again
(a new *attempt*) from the newest checkpoint. With a checkpoint every `c`
steps, a crash at any moment redoes at most `c` steps, and because the
checkpoint holds the model, the optimizer, the random generators and the data
position, the run ends with exactly the weights it would have had.

We kill rank 1 with `SIGKILL` (nothing in the worker can react to it) in the
middle of a run, and count from the events what it cost."""),
    ("code", """import os, signal, time
import ddlkit

c = 10
cfg = ddlkit.RunConfig(strategy="data", world_size=2, model="mlp", dataset="digits", steps=60, batch_size=16,
                       optimizer="adam", lr=0.01, device="cpu", checkpoint_every=c, max_restarts=1)
run = ddlkit.launch(cfg, echo=False)
run.control(slowdown={0: 5.0, 1: 5.0})   # slow the steps down, so there is time to kill one mid-run
while run.steps_done < 25:
    time.sleep(0.05)
os.kill(run.pids[1], signal.SIGKILL)       # kill -9 of rank 1
killed_at = run.steps_done
print(f"killed rank 1 after step {killed_at - 1}; the run is still {run.status}")"""),
    ("md", """The kernel saw rank 1 die, ended rank 0 (stuck waiting for its peer), and
started both again from the newest checkpoint. The run never stopped being
`running`; now wait for it to finish."""),
    ("code", """run.wait(timeout=300)
restart = next(e for e in run.events if e["type"] == "restart")
print(run.status, "| restart:", restart["reason"], "| attempt", restart["attempt"], "from step", restart["from_step"])
assert run.status == "done" and restart["from_step"] % c == 0"""),
    ("md", """**Counting the cost.** `run.events` keeps every step event of every attempt
(each tagged with its `attempt`); `run.metrics` keeps only the latest row per
step, so the loss curve is one line. A step logged by both attempts was done
twice:"""),
    ("code", """rank0_steps = [e["step"] for e in run.events if e["type"] == "step" and e["rank"] == 0]
redone = len(rank0_steps) - len(set(rank0_steps))
print(f"steps redone: {redone} (checkpoint every {c})")
assert redone <= c
assert sorted(run.metrics.query("rank == 0")["step"]) == list(range(cfg.steps))   # one continuous curve"""),
    ("md", """**Nothing else was lost.** The same config run straight through ends with the
same weights, to float32 rounding: the restarted attempt saw the same samples
in the same order with the same optimizer state."""),
    ("code", """straight = ddlkit.launch(cfg.replace(max_restarts=0, checkpoint_every=None), echo=False).wait(300)
gap = max((run.result().state_dict[k] - straight.result().state_dict[k]).abs().max().item()
          for k in straight.result().state_dict)
print(f"largest weight difference to the uninterrupted run: {gap:.1e}")
assert gap < 1e-6"""),
    ("md", """**Changing the layout live.** The same mechanism resizes a running job:
`run.relaunch(world_size=1)` makes the ranks stop together at a step and
checkpoint it, then the run goes on with one rank. The global batch stays 32
(one rank of 32 instead of two of 16), so the curve continues as if nothing
happened; a `layout` event marks the step. No step is lost: the new layout
starts exactly after the last step the old one logged."""),
    ("code", """resized = ddlkit.launch(cfg.replace(max_restarts=0), echo=False)
resized.control(slowdown={0: 5.0, 1: 5.0})
while resized.steps_done < 20:
    time.sleep(0.05)
resized.relaunch(world_size=1)
resized.wait(timeout=300)
layout = next(e for e in resized.events if e["type"] == "layout")
before = [e["step"] for e in resized.events if e["type"] == "step" and e["rank"] == 0 and e["attempt"] == 0]
print(f"layout changed to {layout['world_size']} rank(s) x batch {layout['batch_size']} at step {layout['from_step']}; "
      f"the old layout's last step: {max(before)}")
assert layout["from_step"] == max(before) + 1 and resized.world_size == 1
assert sorted(resized.metrics.query("rank == 0")["step"]) == list(range(cfg.steps))"""),
]


if __name__ == "__main__":
    write("01_data_parallel.ipynb", DATA_PARALLEL)
    write("05_fault_tolerance.ipynb", FAULT_TOLERANCE)
    print("wrote", *sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")), file=sys.stderr)
