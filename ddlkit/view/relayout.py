"""The ControlPanel's world size and strategy while a run goes: changing
either relaunches the run in the new layout (``Run.relaunch``: the ranks stop
at a step, checkpoint it, and go on as the new layout from the same weights and
the same global batch). A change that cannot work is refused: the widgets go
back to the layout the run has, and the error box says why. When the new
layout takes effect (its ``layout`` event), the widgets show it, with the new
per-replica batch.

The dashboard refreshes on its own thread, so ``follow`` may set the widgets
while the user (or a notebook cell) changes one: a lock makes the two take
turns, and only the thread that sets the widgets ignores the changes it makes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import ipywidgets as widgets

from ..config import RunConfig
from ..kernel.run import Run
from . import fields


class LayoutWidgets:
    def __init__(self, widgets_by_field: dict[str, widgets.ValueWidget], show_error: Callable[[str | None], None]):
        self.fields = widgets_by_field
        self.show_error = show_error
        self.layout = (self.fields["world_size"].value, self.fields["strategy"].value)  # the run's, or asked for it
        self.following = False  # this lock's holder is setting the widgets to the run's layout: no relaunch
        self.lock = threading.RLock()  # re-entrant: show's own changes come back through changed
        self.events_seen = 0

    def start(self, config: RunConfig) -> None:
        """A new run, in the layout of ``config``."""
        self.layout, self.events_seen = (config.world_size, config.strategy), 0

    def changed(self, run: Run, valid_config: Callable[[], RunConfig]) -> None:
        """The world size or strategy widget changed: relaunch, or refuse and
        go back. ``valid_config()`` is the panel's config, or a ValueError."""
        with self.lock:
            wanted = (self.fields["world_size"].value, self.fields["strategy"].value)
            if self.following or wanted == self.layout:
                return
            try:
                config = valid_config()
                knobs = {name: value for name, value in config.knobs.items() if name in fields.names_of(config)}
                run.relaunch(world_size=wanted[0], strategy=wanted[1], **knobs)
            except (ValueError, RuntimeError) as error:
                self.show_error(f"layout not changed: {error}")
                self.show(*self.layout)
                return
            self.layout = wanted
            self.show_error(None)

    def follow(self, run: Run) -> None:
        """After a refresh: show the layout a relaunch switched to, if one did."""
        with self.lock:
            layouts = [e for e in run.events[self.events_seen :] if e.get("type") == "layout"]
            self.events_seen = len(run.events)
            if layouts:
                new = layouts[-1]
                self.layout = (new["world_size"], new["strategy"])
                self.show(new["world_size"], new["strategy"], new["batch_size"])

    def show(self, world_size: int, strategy: str, batch_size: int | None = None) -> None:
        """Set the widgets to a layout without relaunching."""
        with self.lock:
            self.following = True
            try:
                self.fields["world_size"].value, self.fields["strategy"].value = world_size, strategy
                if batch_size is not None:
                    self.fields["batch_size"].value = batch_size
            finally:
                self.following = False
