"""Write the tutorial notebooks from the cell sources below (no outputs).

Edit a notebook here, run `python tools/make_notebooks.py`, commit both.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def write(name: str, cells: list[tuple[str, str]], folder: Path = NOTEBOOKS) -> None:
    nb = new_notebook(cells=[new_markdown_cell(src) if kind == "md" else new_code_cell(src) for kind, src in cells])
    for number, cell in enumerate(nb.cells):  # stable ids: regenerating leaves unchanged notebooks unchanged
        cell.id = f"cell-{number}"
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, folder / name)


QUICKSTART = [
    (
        "md",
        """# 00 · Quickstart: a control panel and a live dashboard

Pick an experiment, press **Run**, and watch two processes train a small
network on scikit-learn's digits while this notebook stays free. Move the
**lr** slider while it runs: every rank switches at the same step, and the loss
curve marks the step (a black ▼ where the ranks applied it, over the grey ×
of when you asked). Change the **world size** or the **strategy** while it
runs: the ranks stop together at a step, save it, and the same run goes on in
the new layout from the same weights (a change that cannot work is refused,
the box goes back and the red line says why). **Pause**, **Resume** and
**Stop** act within a fraction of a second. Invalid settings (try model `cnn`
with dataset `sonnets`, or world size 0) are refused before anything starts,
with the reason.""",
    ),
    (
        "code",
        """import ddlkit

panel = ddlkit.ControlPanel(ddlkit.RunConfig(strategy="data", world_size=2, model="mlp", dataset="digits",
                                             steps=300, batch_size=32, optimizer="adam", lr=0.01, device="cpu"))
panel""",
    ),
    (
        "md",
        """The same without widgets: `ddlkit.launch` returns at once and
`ddlkit.Dashboard` keeps drawing from a background thread, about four times a
second, after the cell has returned: loss per rank (faint) and their mean
(bold) against step and wall time, throughput, and where each step's time went
(compute, communication, waiting for data).""",
    ),
    (
        "code",
        """run = ddlkit.launch(panel.config().replace(steps=150), echo=False)
dashboard = ddlkit.Dashboard(run)
dashboard""",
    ),
    (
        "md",
        """A run is only over when we wait for it. Then the numbers the dashboard
drew are in `run.metrics`, one row per rank and step: did training work? With
Adam at lr 0.01 the loss flattens out after about 100 of the 150 steps: the
run trained to a plateau, it was not cut off while still falling.""",
    ),
    (
        "code",
        """run.wait(timeout=300)
loss = run.metrics.groupby("step")["loss"].mean()
first, last = loss.iloc[:10].mean(), loss.iloc[-10:].mean()
before_last = loss.iloc[-60:-50].mean()   # 50 steps before the end
print(f"mean loss over the first 10 steps {first:.3f}, 50 steps before the end {before_last:.3f}, "
      f"over the last 10 {last:.3f}")
assert run.status == "done" and set(run.metrics["rank"]) == {0, 1}
assert last < 0.2 * first                 # it learned
assert before_last - last < 0.2 * first   # and the last 50 steps changed little: a plateau""",
    ),
]

DATA_PARALLEL = [
    (
        "md",
        """# 01 · Data parallelism is large-batch training

**The fact.** In data parallelism every rank holds the whole model and takes its
own share of each global batch. After the backward pass the ranks average their
gradients (an *all-reduce*), so every rank applies the same update. With
`N` ranks of batch `B` the averaged gradient is the gradient of the mean loss
over all `N·B` samples: the run is, step for step, **one process training with
batch `N·B`**. Parallelism changes how fast the work is done, not what is
computed.

We check it: two ranks of batch 16 against one process of batch 32, on the same
samples in the same order, plain SGD, same seed.""",
    ),
    (
        "code",
        """import ddlkit

base = ddlkit.RunConfig(model="mlp", dataset="digits", steps=40, lr=0.1, optimizer="sgd", seed=0, device="cpu")
two_ranks = ddlkit.launch(base.replace(strategy="data", world_size=2, batch_size=16), echo=False)
one_big_batch = ddlkit.launch(base.replace(strategy="single", world_size=1, batch_size=32), echo=False)
two_ranks.status, one_big_batch.status   # both returned at once and train in the background""",
    ),
    (
        "md",
        """While they train the notebook is free. `run.metrics` is a table that grows
as the ranks report. Now wait for both (a run must end before we assert on it).""",
    ),
    (
        "code",
        """two_ranks.wait(timeout=300)
one_big_batch.wait(timeout=300)
two_ranks.metrics.head()""",
    ),
    (
        "md",
        """Each rank logged its own loss on its own 16 samples; their mean is the loss of
the 32-sample batch. The weights at the end are what matter:""",
    ),
    (
        "code",
        """data_weights = two_ranks.result().state_dict
single_weights = one_big_batch.result().state_dict
max_difference = max((data_weights[k] - single_weights[k]).abs().max().item() for k in data_weights)
print(f"largest difference between any two weights: {max_difference:.2e}")
assert max_difference < 1e-5""",
    ),
    (
        "md",
        """Agreement to float32 rounding. Is that because training barely moved the
weights? A single process with batch **16** (the per-rank batch, not the global
one) ends somewhere else entirely:""",
    ),
    (
        "code",
        """small = base.replace(strategy="single", world_size=1, batch_size=16)
small_batch = ddlkit.launch(small, echo=False).wait(300)
small_weights = small_batch.result().state_dict
other_difference = max((small_weights[k] - single_weights[k]).abs().max().item() for k in small_weights)
print(f"batch 16 vs batch 32: {other_difference:.2e}")
assert other_difference > 1000 * max_difference""",
    ),
    (
        "md",
        """The price of the equivalence is communication: every step each rank waits for
the all-reduce. The workers timed it:""",
    ),
    (
        "code",
        """timing = two_ranks.metrics.groupby("rank")[["compute_s", "comm_s"]].mean() * 1000
print(timing.round(3).rename(columns=lambda c: c.replace("_s", " ms")))
assert (two_ranks.metrics["comm_s"] > 0).all()
mean_loss = two_ranks.metrics.groupby("step")["loss"].mean()
single_loss = one_big_batch.metrics.set_index("step")["loss"]
print(f"mean over ranks vs single-process loss, largest gap: {(mean_loss - single_loss).abs().max():.2e}")
assert (mean_loss - single_loss).abs().max() < 1e-4""",
    ),
    (
        "md",
        """## How much faster? Diminishing returns, measured

More ranks share the work of a step, but each step now also pays for an
all-reduce, and the ranks need cores to run on. `ddlkit.sweep` runs the same
experiment (a wider MLP, so there is compute to share) at 1, 2 and 4 ranks,
one after the other. It keeps the **global** batch (256 samples a step, split
over the ranks), so every size computes the same updates and only the time
differs, and gives every rank one thread, so one rank uses one core. *Speedup* is samples/s against one
rank; *parallel efficiency* is speedup divided by the number of ranks (1.0 is
perfect). The table also says how many cores each rank had: past the machine's
core count, ranks take turns on the same cores (`oversubscribed`).""",
    ),
    (
        "code",
        """import os

wider = base.replace(strategy="data", world_size=1, batch_size=256, hidden=1024, steps=30)  # work worth sharing
result = ddlkit.sweep(wider, world_sizes=[1, 2, 4])  # keeps the global batch of 256; one thread per rank
table = result.table
print(table[["world_size", "batch_per_rank", "samples_per_s", "speedup", "efficiency", "cores_per_rank",
             "oversubscribed", "time_to_target_s"]].round(2).to_string(index=False))
result.figure""",
    ),
    (
        "md",
        """Read the efficiency column: below 1 as soon as there is a second rank
(communication is not free, and a small model leaves little compute to hide it
behind), and lower again once the ranks outnumber the cores. (With a tiny model,
two ranks can even be slower than one: try `hidden=128`.)""",
    ),
    (
        "code",
        """cores = len(os.sched_getaffinity(0))
efficiency = dict(zip(table.world_size, table.efficiency.round(2), strict=True))
print(f"{cores} cores; efficiency by world size: {efficiency}")
assert (table["oversubscribed"] == (table["world_size"] > cores)).all()
assert (table.loc[table["world_size"] > 1, "efficiency"] < 1).all()   # diminishing returns
assert table["efficiency"].is_monotonic_decreasing                    # and they diminish further""",
    ),
]

ASYNC_PARAMETER_SERVER = [
    (
        "md",
        """# 04 · Asynchronous training trades fresh gradients for speed

**The fact.** A parameter server holds the weights; workers pull them, compute a
gradient on their own data, and push it back. How long may a worker run on old
weights?

- **bsp** (bulk synchronous): the server waits for every worker each step. Nobody
  is ever stale, and everybody moves at the pace of the slowest worker.
- **async**: every gradient is applied the moment it arrives. Fast workers never
  wait, but a gradient may have been computed on weights that have changed
  since: its **staleness** is how many updates it missed
  (server version when applied minus the version the worker read).
- **ssp** (stale synchronous, bound `s`): a worker may run at most `s` steps
  ahead of the slowest, so staleness never exceeds `s`.

We make the trade visible with one **3x straggler**: rank 0 is the server, ranks 1
and 2 are workers, each step's work takes 20 ms (`delay_s`) and rank 2 is three
times slower (`slowdown`, which `run.control(slowdown=...)` also changes live).""",
    ),
    (
        "code",
        """import ddlkit
from ddlkit import staleness

base = ddlkit.RunConfig(strategy="ps", world_size=3, model="mlp", dataset="digits", hidden=32, steps=40,
                        batch_size=16, lr=0.5, optimizer="sgd", device="cpu",
                        delay_s={1: 0.02, 2: 0.02}, slowdown={2: 3.0})
runs = {}
for sync in ("bsp", "async", "ssp"):   # one after the other: they must not share the CPU while timed
    runs[sync] = ddlkit.launch(base.replace(sync=sync, staleness_bound=2), echo=False).wait(timeout=300)
{sync: run.status for sync, run in runs.items()}""",
    ),
    (
        "md",
        """**Speed.** Samples per second over both workers, while both are still working
(after the fast one is done, the straggler finishes alone in any mode):""",
    ),
    (
        "code",
        """rate = {sync: staleness.throughput_while_all_work(run) for sync, run in runs.items()}
for sync, value in rate.items():
    print(f"{sync:>5}: {value:7.0f} samples/s   ({value / rate['bsp']:.2f}x bsp)")
fast_done = {sync: round(float(run.metrics[run.metrics["rank"] == 1]["time"].agg(lambda t: t.max() - t.min())), 2)
             for sync, run in runs.items()}
print("fast worker's 40 steps took", fast_done, "s")
assert rate["async"] > 1.3 * rate["bsp"]        # ideal: 2x (20 ms + 60 ms workers vs 60 ms lockstep)
assert fast_done["async"] < 0.6 * fast_done["bsp"]""",
    ),
    (
        "md",
        """**Staleness.** Every update the server applied is an `update` event. bsp is
never stale, ssp stays within its bound, async lets it grow: while both work,
the straggler's gradients arrive after the fast worker has moved the weights
about three times (once the fast worker is done, the straggler is alone and fresh).""",
    ),
    (
        "code",
        """tables = {sync: staleness.staleness_table(run) for sync, run in runs.items()}

def straggler_while_both_work(table):
    fast_done = table[table["worker"] == 1]["time"].max()
    return table[(table["worker"] == 2) & (table["time"] <= fast_done)]["staleness"]

for sync, table in tables.items():
    print(f"{sync:>5}: max {table['staleness'].max()}, mean {table['staleness'].mean():.2f}, "
          f"straggler's mean while both work {straggler_while_both_work(table).mean():.2f}")
assert (tables["bsp"]["staleness"] == 0).all()
assert tables["ssp"]["staleness"].max() <= 2
assert straggler_while_both_work(tables["async"]).mean() >= 2 and tables["async"]["staleness"].max() > 2
staleness.figure(runs)   # the three side by side""",
    ),
    (
        "md",
        """**Loss.** A stale gradient points where the loss *was*, not where it is.
Against wall time async applies about twice as many updates per second; per
update, how much staleness costs depends on how far the weights move between
read and apply (learning rate times staleness). What holds run after run here:
all three learn, each ending its 40 steps more than 10% below where it started
(the next cell shows where staleness costs clearly). Loss against wall time,
overlaid:""",
    ),
    (
        "code",
        """import plotly.graph_objects as go

fig = go.Figure(staleness.loss_vs_time(runs))
fig.update_layout(xaxis_title="seconds since launch", yaxis_title="worker loss (smoothed)", height=350)
first, last = {}, {}
for sync, run in runs.items():
    loss = run.metrics.sort_values("time")["loss"]
    first[sync], last[sync] = loss.iloc[:6].mean(), loss.iloc[-6:].mean()
    print(f"{sync:>5}: loss {first[sync]:.3f} -> {last[sync]:.3f} ({last[sync] / first[sync] - 1:+.0%})")
assert all(last[s] < 0.9 * first[s] for s in runs)   # all three learn: a clear drop
fig""",
    ),
    (
        "md",
        """**Where staleness costs loss per step.** bsp and ssp apply exactly the same
updates in number and size (per clock, the mean of both workers' gradients); the
only difference is the weights those gradients were computed on. With a larger
learning rate, on the regression task, the same 40 steps end far apart:""",
    ),
    (
        "code",
        """harder = base.replace(dataset="regression", lr=0.3)
final_loss = {}
for sync, bound in (("bsp", 0), ("ssp", 2)):
    run = ddlkit.launch(harder.replace(sync=sync, staleness_bound=bound), echo=False).wait(timeout=300)
    per_step = run.metrics.groupby("step")["loss"].mean()
    final_loss[sync] = per_step.iloc[-10:].mean()
    print(f"{sync:>4}: mean staleness {staleness.staleness_table(run)['staleness'].mean():.2f}, "
          f"loss over the last 10 steps {final_loss[sync]:.3f}")
assert final_loss["ssp"] > 1.5 * final_loss["bsp"]""",
    ),
    (
        "md",
        """**Where the time goes.** Per rank: how fast it stepped and how long it sat idle
(a worker waiting for the server, the server waiting for gradients). In bsp the
fast worker idles about 40 ms of every 60 ms step; in async it does not.""",
    ),
    (
        "code",
        """for sync in ("bsp", "async"):
    print(sync)
    print(staleness.rank_activity(runs[sync]).round(3).to_string(index=False))
idle = {sync: staleness.rank_activity(run).set_index("rank").loc[1, "idle_s"] for sync, run in runs.items()}
assert idle["bsp"] > 3 * idle["async"]""",
    ),
]

FAULT_TOLERANCE = [
    (
        "md",
        """# 05 · A killed worker costs at most one checkpoint interval

**The fact.** Distributed training is many processes that must all survive:
when one dies, its peers block in their next all-reduce. ddlkit does what
`torchrun --max-restarts` does: it ends every rank and starts them all again
(a new *attempt*) from the newest checkpoint. With a checkpoint every `c`
steps, a crash at any moment redoes at most `c` steps, and because the
checkpoint holds the model, the optimizer, the random generators and the data
position, the run ends with exactly the weights it would have had.

We kill rank 1 with `SIGKILL` (nothing in the worker can react to it) in the
middle of a run, and count from the events what it cost.""",
    ),
    (
        "code",
        """import os
import signal
import time

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
print(f"killed rank 1 after step {killed_at - 1}; the run is still {run.status}")""",
    ),
    (
        "md",
        """The kernel saw rank 1 die, ended rank 0 (stuck waiting for its peer), and
started both again from the newest checkpoint. The run never stopped being
`running`; now wait for it to finish.""",
    ),
    (
        "code",
        """run.wait(timeout=300)
restart = next(e for e in run.events if e["type"] == "restart")
print(run.status, "| restart:", restart["reason"], "| attempt", restart["attempt"], "from step", restart["from_step"])
assert run.status == "done" and restart["from_step"] % c == 0""",
    ),
    (
        "md",
        """**Counting the cost.** `run.events` keeps every step event of every attempt
(each tagged with its `attempt`); `run.metrics` keeps only the latest row per
step, so the loss curve is one line. A step logged by both attempts was done
twice:""",
    ),
    (
        "code",
        """rank0_steps = [e["step"] for e in run.events if e["type"] == "step" and e["rank"] == 0]
redone = len(rank0_steps) - len(set(rank0_steps))
print(f"steps redone: {redone} (checkpoint every {c})")
assert redone <= c
assert sorted(run.metrics.query("rank == 0")["step"]) == list(range(cfg.steps))   # one continuous curve""",
    ),
    (
        "md",
        """**Nothing else was lost.** The same config run straight through ends with the
same weights, to float32 rounding: the restarted attempt saw the same samples
in the same order with the same optimizer state.""",
    ),
    (
        "code",
        """straight = ddlkit.launch(cfg.replace(max_restarts=0, checkpoint_every=None), echo=False).wait(300)
gap = max((run.result().state_dict[k] - straight.result().state_dict[k]).abs().max().item()
          for k in straight.result().state_dict)
print(f"largest weight difference to the uninterrupted run: {gap:.1e}")
assert gap < 1e-6""",
    ),
    (
        "md",
        """**Changing the layout live.** The same mechanism resizes a running job:
`run.relaunch(world_size=1)` makes the ranks stop together at a step and
checkpoint it, then the run goes on with one rank. The global batch stays 32
(one rank of 32 instead of two of 16), so the curve continues as if nothing
happened; a `layout` event marks the step. No step is lost: the new layout
starts exactly after the last step the old one logged.""",
    ),
    (
        "code",
        """resized = ddlkit.launch(cfg.replace(max_restarts=0), echo=False)
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
assert sorted(resized.metrics.query("rank == 0")["step"]) == list(range(cfg.steps))""",
    ),
]


MODEL_PARALLEL = [
    (
        "md",
        """# 02 · Model parallelism: pipelines have bubbles, tensor shards are exact

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
the schedule's shape.""",
    ),
    (
        "code",
        """import ddlkit
from ddlkit import timeline

base = ddlkit.RunConfig(model="mlp", dataset="digits", hidden=32, steps=4, batch_size=16, lr=0.1,
                        optimizer="sgd", seed=0, device="cpu")
pipe = base.replace(strategy="pipeline", world_size=2, pp=2, micro_batches=4, stage_delay=0.02)
gpipe = ddlkit.launch(pipe.replace(schedule="gpipe"), echo=False)
one_f_one_b = ddlkit.launch(pipe.replace(schedule="1f1b"), echo=False)
single = ddlkit.launch(base.replace(strategy="single", world_size=1), echo=False)
for run in (gpipe, one_f_one_b, single):
    run.wait(timeout=300)""",
    ),
    (
        "md",
        """Each stage recorded a span per micro-batch and phase. The timeline of the
last two steps (one row per stage): forward in blue, backward in orange, the
bubble is the white space.""",
    ),
    ("code", """timeline.figure(gpipe)"""),
    (
        "md",
        """Measured bubble: for each step, a rank's idle share of the window from the
first span's start to the last span's end (any rank), averaged over steps
after the first. Theory beside it.""",
    ),
    (
        "code",
        """bubbles = timeline.bubbles(gpipe)
print(bubbles.round(3))
assert (bubbles["measured"] - bubbles["theory"]).abs().max() < 0.05""",
    ),
    (
        "md",
        """GPipe runs all four forwards before any backward; 1F1B starts the backward of
micro-batch 0 as soon as the last stage has it. How many micro-batches each
stage held in flight (forward done, backward not yet):""",
    ),
    (
        "code",
        """import pandas as pd

held = pd.DataFrame({name: timeline.in_flight(run).set_index("stage")["max_in_flight"]
                     for name, run in (("gpipe", gpipe), ("1f1b", one_f_one_b))})
print("micro-batches in flight, most at once, per stage:")
print(held.to_string())
assert held.loc[0, "gpipe"] == 4 and held.loc[0, "1f1b"] == 2
bubble = {name: round(timeline.bubble_fraction(run), 3) for name, run in (("gpipe", gpipe), ("1f1b", one_f_one_b))}
print("bubble:", bubble)""",
    ),
    (
        "md",
        """And the pipeline computed exactly what one process computes on the same
16-sample batches: the loss of each micro-batch is a mean and the schedule
divides the summed gradients by `m`.""",
    ),
    (
        "code",
        """def largest_difference(a, b):
    assert list(a) == list(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)

reference = single.result().state_dict
pipeline_gap = largest_difference(gpipe.result().state_dict, reference)
print(f"pipeline vs single process: {pipeline_gap:.1e}")
assert pipeline_gap < 1e-5""",
    ),
    (
        "md",
        """## Every schedule torch ships, side by side

`torch.distributed.pipelining` ships seven schedules. Four hold two stages per
rank: `interleaved` and `looped_bfs` (rank r: stages r and r+p), `zbv` and
`dualpipev` (in a V: stages r and 2p-1-r). Three split each backward into the
input gradient **I**, which the previous stage waits for, and the weight
gradient **W**, which nobody waits for, and slot the W's into the bubble:
`interleaved_zb`, `zbv`, `dualpipev`. The same model, p=2, m=4, each step F,
I and W cost 50 ms each (`stage_delay=0.05, stage_costs=[1, 1, 1]`). Beside each measured
bubble: its schedule's published formula fed with the measured F, I, W times
(`timeline.theory`).""",
    ),
    (
        "code",
        """schedules = ["gpipe", "1f1b", "interleaved", "looped_bfs", "interleaved_zb", "zbv", "dualpipev"]
runs = {}
for name in schedules:  # one after the other: each run's timing has the cores to itself
    runs[name] = ddlkit.launch(pipe.replace(schedule=name, stage_delay=0.05, stage_costs=[1, 1, 1]),
                               echo=False).wait(timeout=300)
rows = []
for name, run in runs.items():
    bubbles = timeline.bubbles(run)
    rows.append({"schedule": name, "measured bubble": bubbles["measured"].mean(), "theory": bubbles["theory"].iloc[0],
                 "peak activations KiB": timeline.memory_table(run)["peak_activation_bytes"].max() / 1024,
                 "vs single": largest_difference(run.result().state_dict, reference)})
table = pd.DataFrame(rows).set_index("schedule")
print(table.to_string(float_format=lambda v: f"{v:.3g}"))
off = (table["measured bubble"] - table["theory"]).abs()
assert off.max() < 0.03, off
for name in ("interleaved_zb", "zbv", "dualpipev"):  # the zero-bubble schedules beat 1F1B
    assert table.loc[name, "measured bubble"] < table.loc["1f1b", "measured bubble"]
assert table["vs single"].max() < 1e-5  # and every schedule computes what one process computes""",
    ),
    (
        "md",
        """The Gantt of a zero-bubble schedule: forward in blue, input gradients in
red, weight gradients in green. The W's move into what would be the bubble.""",
    ),
    ("code", """timeline.figure(runs["zbv"])"""),
    (
        "md",
        """## Tensor parallelism

Megatron-style: in every block, `q, k, v` and the MLP's `up` are cut by output
columns, `o` and `down` by input rows, so each rank holds half of every big
matrix and each pair needs one all-reduce. Both ranks see the same batch. The
sharded weights are DTensors; the result gathers them back under the
single-process names.""",
    ),
    (
        "code",
        """lm = base.replace(model="lm", dataset="sonnets", seq_len=16, hidden=32)
tensor = ddlkit.launch(lm.replace(strategy="tensor", world_size=2, tp=2), echo=False).wait(300)
lm_single = ddlkit.launch(lm.replace(strategy="single", world_size=1), echo=False).wait(300)
tensor_gap = largest_difference(tensor.result().state_dict, lm_single.result().state_dict)
print(f"tensor parallel vs single process: {tensor_gap:.1e}")
assert tensor_gap < 1e-5""",
    ),
    (
        "md",
        """Each rank stores only its shards (plus the small replicated norms and
embeddings), as its memory event shows:""",
    ),
    (
        "code",
        """shards = timeline.memory_table(tensor).set_index("rank")
whole = timeline.memory_table(lm_single).set_index("rank")
print(shards[["param_bytes", "peak_activation_bytes"]], whole[["param_bytes"]], sep="\\n")
assert (shards["param_bytes"] < 0.75 * whole["param_bytes"][0]).all()""",
    ),
]

HYBRID = [
    (
        "md",
        """# 03 · Hybrids on a 2-D mesh, and FSDP's memory

**The facts.** Parallelisms compose on a grid of ranks, a *device mesh*. With
4 ranks as `dp=2 x pp=2`, each row is one pipeline (a model replica), each
column holds the same stage and averages its gradients. `dp=2 x tp=2` is the
same with tensor shards. Either way a step is still exactly one
single-process step on the global batch. And FSDP, data parallelism in which
each rank keeps only a shard of parameters, gradients and optimizer state,
stores about **1/N** of them per rank: we measure it against DDP.""",
    ),
    (
        "code",
        """import ddlkit
from ddlkit import timeline

base = ddlkit.RunConfig(model="mlp", dataset="digits", hidden=32, steps=4, lr=0.1, optimizer="sgd",
                        seed=0, device="cpu")
dp_pp = ddlkit.launch(base.replace(strategy="hybrid", world_size=4, dp=2, pp=2, micro_batches=2, batch_size=8),
                      echo=False).wait(300)
dp_tp = ddlkit.launch(base.replace(strategy="hybrid", world_size=4, dp=2, tp=2, batch_size=8), echo=False).wait(300)
single = ddlkit.launch(base.replace(strategy="single", world_size=1, batch_size=16), echo=False).wait(300)""",
    ),
    ("md", """Two replicas of batch 8 against one process of batch 16:"""),
    (
        "code",
        """def largest_difference(a, b):
    assert list(a) == list(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)

for name, run in (("dp x pp", dp_pp), ("dp x tp", dp_tp)):
    gap = largest_difference(run.result().state_dict, single.result().state_dict)
    print(f"{name} vs single process: {gap:.1e}")
    assert gap < 1e-5""",
    ),
    (
        "md",
        """The dp x pp run's pipeline timeline, both replicas' stages on one chart
(stage 0 is on ranks 0 and 2):""",
    ),
    ("code", """timeline.figure(dp_pp)"""),
    (
        "md",
        """## FSDP against DDP

Same model, two ranks, Adam (two moment buffers per parameter). Each rank
measured its own bytes during one step (`memory` events: parameters the
optimizer updates, their gradients, optimizer state, peak saved activations).""",
    ),
    (
        "code",
        """from ddlkit import figures

adam = base.replace(world_size=2, batch_size=16, optimizer="adam", lr=3e-3, hidden=64)
ddp = ddlkit.launch(adam.replace(strategy="data"), echo=False).wait(300)
fsdp = ddlkit.launch(adam.replace(strategy="fsdp"), echo=False).wait(300)
memory = {name: timeline.memory_table(run).set_index("rank") for name, run in (("ddp", ddp), ("fsdp", fsdp))}
print(memory["ddp"], memory["fsdp"], sep="\\n")
kept = {name: table["param_bytes"] + table["grad_bytes"] + table["optimizer_bytes"] for name, table in memory.items()}
ratio = kept["fsdp"] / kept["ddp"]
figures.figure([ddp, fsdp], keys=["memory"]).show()   # the dashboard's memory panel: DDP and FSDP side by side
print("FSDP / DDP, parameters + gradients + optimizer state per rank:", ratio.round(3).tolist())
assert ((ratio > 0.45) & (ratio < 0.55)).all()""",
    ),
    (
        "md",
        """The price is communication: DDP all-reduces the gradients once; FSDP
all-gathers the parameters for forward and again for backward, then
reduce-scatters the gradients. Payload bytes each rank handed to collectives
in the measured step (`comm` events):""",
    ),
    (
        "code",
        """def comm_bytes(run):
    return sum(e["comm_bytes"] for e in run.events if e["type"] == "comm") / run.world_size

print(f"DDP {comm_bytes(ddp) / 1024:.0f} KiB, FSDP {comm_bytes(fsdp) / 1024:.0f} KiB per rank per step")
assert 1.5 < comm_bytes(fsdp) / comm_bytes(ddp) < 2.5""",
    ),
]


def cells_from(file: str, name: str) -> list[tuple[str, str]]:
    """A notebook's cells kept in their own file beside this one."""
    spec = importlib.util.spec_from_file_location(file.removesuffix(".py"), Path(__file__).resolve().parent / file)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, name)


def write_all(folder: Path = NOTEBOOKS) -> None:
    for name, cells in [
        ("00_quickstart.ipynb", QUICKSTART),
        ("01_data_parallel.ipynb", DATA_PARALLEL),
        ("02_model_parallel.ipynb", MODEL_PARALLEL),
        ("03_hybrid.ipynb", HYBRID),
        ("04_async_parameter_server.ipynb", ASYNC_PARAMETER_SERVER),
        ("05_fault_tolerance.ipynb", FAULT_TOLERANCE),
        ("06_federated.ipynb", cells_from("notebook_federated.py", "FEDERATED")),
        ("07_communication.ipynb", cells_from("notebook_communication.py", "COMMUNICATION")),
        ("08_load_balancing.ipynb", cells_from("notebook_load_balancing.py", "LOAD_BALANCING")),
        ("09_from_notebook_to_cluster.ipynb", cells_from("notebook_cluster.py", "CLUSTER")),
    ]:
        write(name, cells, folder)


if __name__ == "__main__":
    write_all()
    print("wrote", *sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")), file=sys.stderr)
