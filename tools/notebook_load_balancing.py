"""The cells of notebooks/08_load_balancing.ipynb (written by tools/make_notebooks.py)."""

LOAD_BALANCING = [
    (
        "md",
        """# 08 · Load balancing: idle time made visible, and removed without changing training

**The fact**: in synchronous data parallelism every rank waits at the
all-reduce for the slowest one. With rank 1 at half speed, rank 0 spends a
large part of each step *idle*. Giving each rank a share of the global batch
in proportion to its speed (`balance="dynamic"`: re-measured every
`balance_every` steps, all ranks switching at the same step) removes most of
that idle time and raises throughput, while the updates stay exactly those of
one process on the whole global batch: each rank's loss is weighted by its
share before the all-reduce averages it.

Idle time is measured on sampled steps (`time_every`): a one-element
all-reduce just before the gradients' tells how long a rank waited for the
last one to arrive (`idle_s`); the gradients' own all-reduce is `transfer_s`.""",
    ),
    (
        "code",
        """import ddlkit
from ddlkit import balance

# One slow rank: rank 1 computes at half speed (`speeds`, a persistent factor; `slowdown` is the live one).
# `sample_work_s` adds 0.2 ms of simulated compute per sample (a sleep, scaled by the rank's speed like its real
# compute): work that follows the shares and outweighs the all-reduce, measurable even on a busy 2-core machine.
base = ddlkit.RunConfig(strategy="data", world_size=2, model="mlp", hidden=64, dataset="digits", batch_size=256,
                        sample_work_s=2e-4, steps=50, lr=0.05, seed=0, device="cpu", speeds={1: 0.5}, time_every=2,
                        balance_every=10)
runs = {}
for mode in ("none", "dynamic"):  # one after the other: on a small machine, side by side they would share the cores
    runs[mode] = ddlkit.launch(base.replace(balance=mode), echo=False).wait(timeout=600)
STEADY = 20  # steps before are warm-up and the first re-shares
idle = {mode: balance.idle_table(run, from_step=STEADY) for mode, run in runs.items()}
speed = {mode: balance.throughput(run, from_step=STEADY) for mode, run in runs.items()}
for mode in runs:
    print(f"{mode:8s} idle fraction rank 0 {idle[mode].loc[0, 'idle_fraction']:.0%}, "
          f"rank 1 {idle[mode].loc[1, 'idle_fraction']:.0%}; {speed[mode]:,.0f} samples/s")
print("shares of the global batch (dynamic):", balance.shares(runs["dynamic"]).to_dict("index"))
ddlkit.figures.figure({f"balance={mode}": run for mode, run in runs.items()}, keys=["idle", "shares", "throughput"])""",
    ),
    (
        "md",
        """Without balancing, the fast rank 0 waits for a large part of every step
(the slow rank hardly waits). With `balance="dynamic"` the shares move to
about 2:1 and the idle time of rank 0 drops by at least half; throughput
rises by at least 1.25x (ideal: 1.5x, if all of a step were compute;
`benchmarks/load_balancing.py` measures it with real compute only). And the
weights are the same: uneven shares, weighted, give the same update.""",
    ),
    (
        "code",
        """drop = idle["dynamic"].loc[0, "idle_fraction"] / idle["none"].loc[0, "idle_fraction"]
gain = speed["dynamic"] / speed["none"]
none_state, dynamic_state = (runs[m].result().state_dict for m in ("none", "dynamic"))
worst = max((none_state[k] - dynamic_state[k]).abs().max().item() for k in none_state)
print(f"rank 0 idle x{drop:.2f}, throughput x{gain:.2f}, weights differ by at most {worst:.1e}")
assert idle["none"].loc[0, "idle_fraction"] > 0.25  # large without balancing
assert drop <= 0.5 and gain >= 1.25
assert worst < 1e-5  # the same updates, whatever the shares""",
    ),
    (
        "md",
        """## A rank that slows down mid-run

Both ranks start at full speed; a third of the way through, `run.control(slowdown={1: 2.0})`
halves rank 1's speed while training goes on. The balancer's next
re-measurements see it and move samples to rank 0; the idle panel shows rank
0's idle time jump at the slowdown, then shrink as the shares follow.""",
    ),
    (
        "code",
        """import time

run = ddlkit.launch(base.replace(speeds=None, balance="dynamic", steps=110, time_every=1), echo=False)
while run.steps_done < 30 and run.status in ("starting", "running"):
    time.sleep(0.05)
run.control(slowdown={1: 2.0})
run.wait(timeout=600)
slowed = next(e["step"] for e in run.events if e["type"] == "control" and "slowdown" in e)
rows = run.metrics[run.metrics["rank"] == 0].set_index("step")["idle_s"] / run.metrics[
    run.metrics["rank"] == 0].set_index("step")["step_time"]
next_share = (slowed // 10 + 1) * 10  # the first re-share after the slowdown
just_after = rows.loc[slowed:next_share - 1].median()
absorbed = rows.loc[next_share + 30:].median()  # three re-measurements later
shares = balance.shares(run)
print(f"slowdown at step {slowed}; rank 0 idle {just_after:.0%} before the next re-share, {absorbed:.0%} after 3 more;"
      f" shares {shares.iloc[0].tolist()} -> {shares.iloc[-1].tolist()}")
assert absorbed <= 0.5 * just_after  # absorbed
assert shares.iloc[-1][0] > 1.5 * shares.iloc[-1][1]  # rank 0 now takes most of the batch
ddlkit.figures.figure(run, keys=["idle", "shares"])""",
    ),
    (
        "md",
        """## Pipelines: cut by time, not by parameters

`cut_points=None` balances pipeline stages by parameter count. On the
character LM with long windows (`seq_len=512`) the position embedding holds
most parameters but costs almost no time, while the attention blocks hold few
parameters and cost nearly all of it: parameter cuts give the embedding a
stage of its own and both blocks to the other. `cut_points="auto"` profiles
each layer's forward + backward on a micro-batch and cuts to minimise the
slowest stage (a linear partition). The slowest stage's time halves, and the
step time falls with it: with four micro-batches in flight the step is paced
by the slowest stage. (The step time falls only where the two ranks have
cores of their own; on a machine busy with other work they take turns.)""",
    ),
    (
        "code",
        """lm = ddlkit.RunConfig(strategy="pipeline", world_size=2, pp=2, model="lm", dataset="sonnets", seq_len=512,
                      hidden=16, batch_size=4, micro_batches=4, steps=8, device="cpu", seed=0)
pipes = {cuts: ddlkit.launch(lm.replace(cut_points=cuts), echo=False).wait(timeout=600) for cuts in (None, "auto")}
(report,) = [e for e in pipes["auto"].events if e["type"] == "cuts"]
rows = {cuts: run.metrics[run.metrics["step"] >= 1] for cuts, run in pipes.items()}
slowest = {cuts: r.groupby("rank")["compute_s"].median().max() for cuts, r in rows.items()}  # measured in the runs
step_time = {cuts: r.groupby("step")["step_time"].max().median() for cuts, r in rows.items()}
print(f"cuts by parameters {report['param_cuts']}: slowest stage {max(report['param_stage_s']) * 1e3:.1f} ms profiled, "
      f"{slowest[None] * 1e3:.0f} ms a step in the run; auto {report['cuts']}: {max(report['stage_s']) * 1e3:.1f} ms, "
      f"{slowest['auto'] * 1e3:.0f} ms")
print(f"step time {step_time[None] * 1e3:.0f} ms -> {step_time['auto'] * 1e3:.0f} ms "
      f"({step_time['auto'] / step_time[None]:.2f}x)")
assert max(report["stage_s"]) < max(report["param_stage_s"]) and slowest["auto"] < 0.8 * slowest[None]
assert step_time["auto"] < step_time[None]  # 0.68-0.76x with two free cores: the ranks work at once
balance.cuts_figure(pipes["auto"])""",
    ),
]
