"""A run's events read *incrementally* into numpy arrays (per rank, and per
step over all ranks), for panels that redraw on every refresh: a refresh only
parses the events that arrived since the last one, and traces are downsampled
(:func:`downsample`) so a refresh costs the same at 200 events or 200,000.

>>> from ddlkit.kernel.run import Run
>>> run = Run.from_events([{"type": "step", "rank": r, "step": s, "time": 1.0 + s, "loss": 1.0 / (s + 1)}
...                        for s in range(3) for r in (0, 1)], started=0.0)
>>> data = RunData(run)
>>> sorted(data.ranks), data.steps().tolist(), data.mean("loss_sum", data.steps()).round(2).tolist()
([0, 1], [0, 1, 2], [1.0, 0.5, 0.33])
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..kernel.run import Run

MAX_POINTS = 600  # per trace sent to the browser: a panel is 400-600 px wide
RECENT_POINTS = 200  # the newest points of a trace are never thinned
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
TIMES = ("compute_s", "comm_s", "wait_s")
MODELLED = ("network_s",)  # seconds the emulated network's model added (ddlkit.rank.emulated)
MEMORY = ("param_bytes", "grad_bytes", "optimizer_bytes", "peak_activation_bytes")
KEPT = ("eval", "round", "partition", "balance", "cuts")  # events panels draw one point or bar each: kept as they are


def tint(color: str, shade: float) -> str:
    """``color`` (#rrggbb) mixed with white: ``shade`` 1 is the colour, 0 white.
    Shades of a run's colour tell stacked parts apart (in the legend too,
    which opacity would not).

    >>> tint("#1f77b4", 1.0), tint("#000000", 0.5)
    ('#1f77b4', '#808080')
    """
    rgb = [int(color[i : i + 2], 16) for i in (1, 3, 5)]
    return "#" + "".join(f"{round(255 - (255 - c) * shade):02x}" for c in rgb)


# ---- incremental data ------------------------------------------------------
class _Column:
    """A float array that grows by doubling: appending is amortised O(new)."""

    def __init__(self) -> None:
        self._data = np.empty(256)
        self.size = 0

    def extend(self, values: list[float]) -> None:
        end = self.size + len(values)
        if end > len(self._data):
            grown = np.empty(max(end, 2 * len(self._data)))
            grown[: self.size] = self._data[: self.size]
            self._data = grown
        self._data[self.size : end] = values
        self.size = end

    @property
    def values(self) -> np.ndarray:
        return self._data[: self.size]


class _PerStep:
    """Arrays indexed by step number, folded over ranks as events arrive."""

    FIELDS = ("count", "loss_sum", "samples_sum", "step_time_max", "time_max", *TIMES, *MODELLED)

    def __init__(self) -> None:
        self.arrays = {name: np.zeros(256) for name in self.FIELDS}

    def add(self, steps: np.ndarray, columns: dict[str, np.ndarray]) -> None:
        needed = int(steps.max()) + 1
        if needed > len(self.arrays["count"]):
            size = max(needed, 2 * len(self.arrays["count"]))
            self.arrays = {name: np.concatenate([a, np.zeros(size - len(a))]) for name, a in self.arrays.items()}
        a = self.arrays
        np.add.at(a["count"], steps, 1)
        np.add.at(a["loss_sum"], steps, np.nan_to_num(columns["loss"]))
        np.add.at(a["samples_sum"], steps, np.nan_to_num(columns["samples"]))
        np.maximum.at(a["step_time_max"], steps, np.nan_to_num(columns["step_time"]))
        np.maximum.at(a["time_max"], steps, columns["time"])
        for name in (*TIMES, *MODELLED):
            np.add.at(a[name], steps, np.nan_to_num(columns[name]))


class RunData:
    """What the panels read of one run, kept up to date by :meth:`update`,
    which parses only the events that arrived since it last ran."""

    def __init__(self, run: Run, color: str = COLORS[0], read: bool = True, name: str | None = None):
        self.run = run
        self.color = color
        self.name = name  # what legends call the run (default: its id's last part and its ranks)
        self.cursor = 0  # events read so far
        self.ranks: dict[int, dict[str, _Column]] = {}  # rank -> step, time, loss
        self.per_step = _PerStep()
        self.event_counts: dict[str, int] = {}
        self.markers: list[dict[str, Any]] = []  # control and control_request events
        self.memory: dict[int, dict[str, float]] = {}  # rank -> bytes by kind
        self.idle: dict[int, dict[str, _Column]] = {}  # rank -> step, idle fraction (sampled steps: idle_s)
        self.layouts: list[tuple[int, int]] = []  # (from step, ranks) of each layout the run had, once it changed
        self.kept: dict[str, list[dict[str, Any]]] = {kind: [] for kind in KEPT}
        if read:
            self.update()

    @property
    def label(self) -> str:
        """Short, for legends: its name, or the run id's last part (its random suffix) and the ranks."""
        if self.name is not None:
            return self.name
        short = self.run.id.rsplit("-", 1)[-1]
        return f"{short} · {self.run.world_size} rank{'s' if self.run.world_size != 1 else ''}"

    def update(self, limit: int | None = None) -> int:
        """Read the new events (at most ``limit``); returns how many were read."""
        events = self.run.events
        end = len(events)  # the collector only appends: everything below `end` is complete
        if limit is not None:
            end = min(end, self.cursor + limit)
        new = events[self.cursor : end]
        self.cursor = end
        if not new:
            return 0
        started = self.run.started
        columns: dict[str, list[float]] = {
            k: [] for k in ("rank", "step", "time", "loss", "samples", "step_time", *TIMES, *MODELLED)
        }
        nan = math.nan
        for event in new:
            kind = str(event.get("type"))
            self.event_counts[kind] = self.event_counts.get(kind, 0) + 1
            if kind == "step":
                columns["rank"].append(event["rank"])
                columns["step"].append(event["step"])
                columns["time"].append(event["time"] - started)
                for name in ("loss", "samples", "step_time", *TIMES, *MODELLED):
                    value = event.get(name)
                    columns[name].append(nan if value is None else value)
                if event.get("idle_s") is not None and event.get("step_time"):
                    idle = self.idle.setdefault(event["rank"], {"step": _Column(), "fraction": _Column()})
                    idle["step"].extend([event["step"]])
                    idle["fraction"].extend([min(event["idle_s"] / event["step_time"], 1.0)])
            elif kind in ("control", "control_request"):
                self.markers.append(event)
            elif kind == "memory":
                self.memory[event["rank"]] = {name: float(event.get(name, 0.0)) for name in MEMORY}
            elif kind == "layout":  # a relaunch: from its step on, a step is complete with its ranks
                first = len(set(self.ranks) | {int(r) for r in columns["rank"]})  # the ranks of the first layout
                self.layouts += [(0, first)] if not self.layouts else []
                self.layouts.append((event["from_step"], event["world_size"]))
            elif kind in KEPT:
                self.kept[kind].append(event)
        if columns["step"]:
            self._add_steps({k: np.asarray(v, dtype=float) for k, v in columns.items()})
        return len(new)

    def _add_steps(self, columns: dict[str, np.ndarray]) -> None:
        ranks = columns["rank"].astype(int)
        for rank in np.unique(ranks):
            mine = ranks == rank
            series = self.ranks.setdefault(int(rank), {k: _Column() for k in ("step", "time", "loss")})
            for name, column in series.items():
                column.extend(columns[name][mine])
        self.per_step.add(columns["step"].astype(int), columns)

    # ---- derived series, cheap enough for every refresh ---------------------
    def steps(self, complete: bool = False) -> np.ndarray:
        """Steps some rank logged (``complete``: every rank of the step's layout
        logged: all seen so far, or, after a relaunch, as many as its layout has).

        >>> run = Run.from_events([{"type": "step", "rank": r, "step": s, "time": 1.0, "loss": 1.0}
        ...                        for s, ranks in ((0, (0, 1)), (1, (0, 1)), (2, (0,))) for r in ranks])
        >>> RunData(run).steps(complete=True).tolist()
        [0, 1]
        >>> run.record([{"type": "layout", "from_step": 2, "world_size": 1, "strategy": "data", "batch_size": 2}])
        >>> RunData(run).steps(complete=True).tolist()  # step 2 ran on one rank: it is complete
        [0, 1, 2]
        """
        count = self.per_step.arrays["count"]
        if not complete:
            return np.flatnonzero(count >= 1)
        expected = np.full(len(count), max(len(self.ranks), 1))
        for start, ranks in self.layouts:
            expected[start:] = ranks
        return np.flatnonzero((count >= expected) & (count >= 1))

    def mean(self, name: str, steps: np.ndarray) -> np.ndarray:
        a = self.per_step.arrays
        return a[name][steps] / a["count"][steps]

    def throughput(self) -> tuple[np.ndarray, np.ndarray]:
        """Samples per second over all ranks, per complete step: the samples
        summed over ranks, divided by the slowest rank's step time (the ranks of
        a synchronous step finish together)."""
        steps = self.steps(complete=True)
        a = self.per_step.arrays
        step_time = a["step_time_max"][steps]
        with np.errstate(divide="ignore", invalid="ignore"):
            rate = np.where(step_time > 0, a["samples_sum"][steps] / step_time, np.nan)
        return steps, rate

    def samples_per_s(self) -> float:
        """The run's throughput: from the summary when it finished, else the
        complete steps so far."""
        if self.run.summary.get("samples_per_s"):
            return float(self.run.summary["samples_per_s"])
        steps = self.steps(complete=True)
        a = self.per_step.arrays
        total_time = a["step_time_max"][steps].sum()
        return float(a["samples_sum"][steps].sum() / total_time) if total_time > 0 else math.nan

    def step_at(self, seconds: float) -> float:
        """The step the run was at ``seconds`` after launch."""
        steps = self.steps()
        times = self.per_step.arrays["time_max"][steps]
        return float(np.interp(seconds, times, steps)) if len(steps) else 0.0

    def ended(self) -> bool:
        return self.run.status not in ("starting", "running")

    def caught_up(self) -> bool:
        return self.cursor == len(self.run.events)


def downsample(y: np.ndarray, max_points: int = MAX_POINTS, recent: int = RECENT_POINTS) -> np.ndarray:
    """Indices of the points to draw. The newest ``recent`` points are all kept;
    the older ones are cut into equal buckets, each keeping its minimum and
    maximum (so spikes survive), plus the very first point.

    >>> downsample(np.arange(10.0), max_points=100).tolist() == list(range(10))
    True
    >>> len(downsample(np.random.rand(100_000))) <= 1000
    True
    """
    n = len(y)
    if n <= max_points:
        return np.arange(n)
    old = n - recent
    per_bucket = -(-old // ((max_points - recent - 1) // 2))  # ceil: at most that many buckets
    buckets = -(-old // per_bucket)
    padded = np.full(buckets * per_bucket, np.nan)  # the last bucket padded with NaN
    padded[:old] = y[:old]
    grid = padded.reshape(buckets, per_bucket)
    offsets = np.arange(buckets) * per_bucket
    lows = np.argmin(np.where(np.isnan(grid), np.inf, grid), axis=1) + offsets
    highs = np.argmax(np.where(np.isnan(grid), -np.inf, grid), axis=1) + offsets
    return np.unique(np.concatenate([[0], np.minimum(lows, old - 1), np.minimum(highs, old - 1), np.arange(old, n)]))


@dataclass
class Context:
    """What a panel may need besides the runs."""

    baseline: RunData | None = None
