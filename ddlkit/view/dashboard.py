"""A live dashboard: one plotly FigureWidget with the panels of
:mod:`ddlkit.figures`, redrawn by a background thread about four times a
second while the runs go on, whatever the kernel is doing.

Why a timer and one widget: every FigureWidget ships ~5 MB of JavaScript, so
all panels are subplots of one; and a widget update resends whole arrays and
the Jupyter server silently drops widget messages above 1,000/s, so updates are
coalesced: one refresh per tick sends whatever arrived since the last one, with
every trace downsampled to a bounded number of points.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import plotly.graph_objects as go

from ..kernel.run import Run
from . import figures
from .fit import filling

REFRESH_S = 0.25
# A dashboard opened on a long run catches up over several refreshes rather than in one
# long one: parsing costs ~1 us an event, so a refresh stays well inside its 50 ms budget.
MAX_EVENTS_PER_REFRESH = 20_000
# What a refresh may change in a trace; anything else changing means a new layout.
DATA_KEYS = ("x", "y", "base", "width", "offset", "text", "hovertext", "marker")


class Dashboard:
    """Live panels of one or several runs (overlaid), and optionally the
    speedup of each against a ``baseline`` run.

    In a notebook, show it: it draws while the run goes on, and its thread
    ends after the run does::

        run = ddlkit.launch(ddlkit.RunConfig(strategy="data", world_size=2, steps=300))
        ddlkit.Dashboard(run)

    A finished run is drawn once, with no thread:

    >>> run = Run.from_events([{"type": "step", "rank": 0, "step": s, "time": 1.0 + s, "loss": 1.0} for s in range(3)])
    >>> dashboard = Dashboard(run)
    >>> dashboard.running, any(trace.name == "mean loss" for trace in dashboard.figure.data)
    (False, True)
    """

    def __init__(self, runs: Run | list[Run], baseline: Run | None = None, interval: float = REFRESH_S):
        self.data, self.context = figures.load(runs, baseline, read=False)  # refreshes read, in slices
        self.interval = interval
        self.figure = go.FigureWidget()
        self.last_refresh_s = 0.0  # what the last refresh cost the kernel
        self.refreshes = 0
        self._listeners: list[Callable[[Dashboard], None]] = []
        self._signature: tuple | None = None
        self._lock = threading.Lock()  # the timer thread and a caller's refresh() never interleave
        self._closed = threading.Event()
        self.widget = filling(self.figure)  # what a notebook shows: the figure, as wide as the output
        self.refresh()
        self._thread: threading.Thread | None = None
        if not self._done():
            self._thread = threading.Thread(target=self._loop, name="ddlkit-dashboard", daemon=True)
            self._thread.start()

    @property
    def runs(self) -> list[Run]:
        return [data.run for data in self.data]

    @property
    def running(self) -> bool:
        """Whether the refresh thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def on_refresh(self, listener: Callable[[Dashboard], None]) -> None:
        """Call ``listener(dashboard)`` after each refresh, on the refresh thread
        (the control panel updates its status line this way)."""
        self._listeners.append(listener)

    def refresh(self) -> float:
        """Read new events and redraw; returns the seconds it cost."""
        with self._lock:
            started = time.perf_counter()
            arrived = sum(data.update(MAX_EVENTS_PER_REFRESH) for data in self._all_data())
            title = figures.title_of(self.data)
            if arrived or title != self.figure.layout.title.text or self._signature is None:
                self._redraw(title)
            self.last_refresh_s = time.perf_counter() - started
            self.refreshes += 1
        for listener in self._listeners:
            listener(self)
        return self.last_refresh_s

    def close(self) -> None:
        """Stop refreshing (the figure keeps what it shows)."""
        self._closed.set()
        self.join()

    def join(self, timeout: float | None = None) -> None:
        """Wait for the refresh thread to end (it ends after the runs do)."""
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)

    # ---- internals ----------------------------------------------------------

    def _all_data(self) -> list[figures.RunData]:
        base = self.context.baseline
        return self.data + ([base] if base is not None and base not in self.data else [])

    def _done(self) -> bool:
        """Every run ended and every event drawn: nothing left to refresh."""
        return all(data.ended() and data.caught_up() for data in self._all_data())

    def _loop(self) -> None:
        while not self._closed.wait(self.interval):
            # Whether the runs had ended is read BEFORE the refresh: a run that
            # ends during a refresh gets one more, so its final status ("stopped",
            # "done") is drawn in the title, never a stale "running".
            ended = all(data.ended() for data in self._all_data())
            try:
                self.refresh()
            except Exception as exc:  # a drawing bug must not pass silently, nor kill the run
                self.figure.layout.title = f"dashboard stopped: {type(exc).__name__}: {exc}"
                raise
            if ended and self._done():
                return

    def _redraw(self, title: str) -> None:
        panels = figures.active_panels(self.data, self.context)
        traces = figures.panel_traces(self.data, self.context, panels)
        signature = (tuple(p.key for p in panels), tuple((t.get("type"), t.get("name")) for ts in traces for t in ts))
        if signature != self._signature:  # a panel, run or rank appeared: lay out again
            figures.build_figure(self.data, self.context, panels, traces, title, figure=self.figure)
            self._signature = signature
        else:
            self._update_in_place([t for ts in traces for t in ts], title)

    def _update_in_place(self, traces: list[dict[str, Any]], title: str) -> None:
        """Send only the data that changed: styles stay as laid out."""
        with self.figure.batch_update():
            for shown, new in zip(self.figure.data, traces, strict=True):
                changed = {key: new[key] for key in DATA_KEYS if key in new and not _same(shown[key], new[key])}
                if changed:
                    shown.update(changed)
            if self.figure.layout.title.text != title:
                self.figure.layout.title.text = title


def _same(shown: Any, new: Any) -> bool:
    if isinstance(new, np.ndarray) or isinstance(shown, np.ndarray):
        return shown is not None and np.shape(shown) == np.shape(new) and np.array_equal(shown, new)
    if isinstance(new, dict):  # a nested property (marker): compare what we set
        return shown is not None and all(_same(shown[k], v) for k, v in new.items())
    if isinstance(new, (list, tuple)) and isinstance(shown, (list, tuple)):
        return len(shown) == len(new) and all(_same(a, b) for a, b in zip(shown, new, strict=True))
    return shown == new
