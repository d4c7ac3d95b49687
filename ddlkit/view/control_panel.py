"""ControlPanel: pick an experiment with widgets, press Run, steer it live,
watch it in the embedded dashboard.

Every field widget maps to one RunConfig field: the common fields, then the
knobs of the chosen strategy, as its file declares them (``ddlkit.view.fields``).
"""

from __future__ import annotations

import html
import math
import threading
import time
from typing import Any

import ipywidgets as widgets

from .. import registry
from ..config import RunConfig
from ..kernel.forkserver import warm_up
from ..kernel.launch import launch
from ..kernel.run import Run
from ..knobs import Widget
from . import fields
from .dashboard import Dashboard
from .relayout import LayoutWidgets

LR_SEND_S = 0.25  # the slider sends at most this often while dragged; the last value always arrives


class ControlPanel:
    """Widgets for a RunConfig, Run / Pause / Stop, a status line, a progress
    bar, an error box, and a live dashboard of the current run.

    >>> import ddlkit
    >>> panel = ddlkit.ControlPanel(ddlkit.RunConfig(steps=20, device="cpu"))
    >>> panel.fields["model"].value = "cnn"; panel.fields["dataset"].value = "sonnets"
    >>> panel.run_button.disabled, "cannot train" in panel.status.value
    (True, True)
    """

    def __init__(self, config: RunConfig | None = None):
        self.base = config or RunConfig()
        self.run: Run | None = None
        self.dashboard: Dashboard | None = None
        self.fields: dict[str, widgets.ValueWidget] = {}
        self.hints: dict[str, Widget] = {}
        self._lr_sent: float | None = None  # the learning rate the run has, as far as we sent it
        self._last_lr_send = 0.0
        self._lr_lock = threading.Lock()
        self._slowdown_sent: dict[int, float] = {}  # the straggler the run has, as far as we sent it

        self.run_button = widgets.Button(description="Run", button_style="success", icon="play")
        self.pause_button = widgets.Button(description="Pause", icon="pause", disabled=True)
        self.stop_button = widgets.Button(description="Stop", button_style="danger", icon="stop", disabled=True)
        self.progress = widgets.IntProgress(value=0, min=0, max=self.base.steps, description="progress")
        self.status = widgets.HTML()
        self.error = widgets.HTML(layout=widgets.Layout(display="none"))
        self.knob_box = widgets.HBox(layout=widgets.Layout(flex_flow="row wrap"))  # federated has ~20 knobs
        self.slow_rank, self.slowdown = self._straggler_row()
        self.network = self.fields["network"] = fields.network_menu(self.base.network)  # sent live during a run
        self.hints["network"] = fields.NETWORK
        self.network.observe(lambda _: self._validate(), "value")
        self.network.observe(lambda _: self._send_knob("network"), "value")
        self.dashboard_box = widgets.VBox(layout=widgets.Layout(width="100%"))
        for name, hint in fields.COMMON.items():
            self._add_field(name, hint)
        self.layout = LayoutWidgets(self.fields, self.show_error)
        self.run_button.on_click(lambda _: self.start())
        self.pause_button.on_click(lambda _: self.toggle_pause())
        self.stop_button.on_click(lambda _: self.stop())
        self.fields["strategy"].observe(lambda _: self._show_knobs(), "value")
        self.fields["lr"].observe(self._lr_moved, "value")
        self._tag_for_browser_tests()
        self._show_knobs()
        warm_up()  # the starter preloads torch in the background: the Run click finds it ready
        f = self.fields
        self.widget = widgets.VBox(
            [
                widgets.HBox([f["strategy"], f["world_size"], f["model"], f["dataset"]]),
                widgets.HBox([f["batch_size"], f["steps"], f["lr"]]),
                self.knob_box,
                widgets.HBox([self.slow_rank, self.slowdown, self.network]),
                widgets.HBox([self.run_button, self.pause_button, self.stop_button, self.progress]),
                self.status,
                self.error,
                self.dashboard_box,
            ]
        )

    def _straggler_row(self) -> tuple[widgets.BoundedIntText, widgets.FloatSlider]:
        """A straggler for any strategy: rank ``slow_rank`` takes ``slowdown`` times
        as long per step; before a run it is the config's slowdown, during one it is sent live."""
        rank, factor = next(iter((self.base.slowdown or {}).items()), (self.base.world_size - 1, 1.0))
        style, width = {"description_width": "initial"}, widgets.Layout(width="150px")
        slow_rank = widgets.BoundedIntText(
            value=rank, min=0, max=63, description="slow rank", style=style, layout=width
        )
        slowdown = widgets.FloatSlider(
            value=factor, min=1.0, max=10.0, step=0.5, description="slowdown ×", continuous_update=False
        )
        for widget in (slow_rank, slowdown):
            widget.observe(self._straggler_changed, "value")
        return slow_rank, slowdown

    def _tag_for_browser_tests(self) -> None:
        """CSS classes: handles for browser tests and custom styles."""
        for name in ("run", "pause", "stop"):
            getattr(self, f"{name}_button").add_class(f"ddlkit-{name}")
        self.status.add_class("ddlkit-status")
        self.dashboard_box.add_class("ddlkit-dashboard")
        self.error.add_class("ddlkit-error")

    # ---- the experiment --------------------------------------------------------
    def config(self) -> RunConfig:
        """The RunConfig the widgets describe (the rest from the panel's config)."""
        config = self.base.for_strategy(self.fields["strategy"].value)
        shown = [*fields.COMMON, *(name for name, _ in fields.fields_of(config))]
        return config.replace(
            **{
                name: fields.value_of(self.hints[name], self.fields[name]) for name in shown if name in self.fields
            },  # a new strategy's knobs appear after this check
            slowdown=self._slowdown() or None,
            network=self.network.value,
        )

    def _slowdown(self) -> dict[int, float]:
        return {self.slow_rank.value: self.slowdown.value} if self.slowdown.value > 1 else {}

    def check(self) -> str | None:
        """The validation message of the current settings, or None if valid."""
        try:
            self.config().validate()
        except ValueError as error:
            return str(error)
        return None

    def start(self) -> Run | None:
        """What Run does: launch the widgets' config (refused, with the
        validation message, if it is invalid) and show its dashboard."""
        problem = self.check()
        if problem is not None:
            self.show_error(f"not started: {problem}")
            return None
        if self.run is not None and self.run.live:
            self.show_error("a run is going: stop it first")
            return None
        if self.dashboard is not None:
            self.dashboard.close()
        config = self.config()
        self._slowdown_sent = dict(config.slowdown or {})
        self.layout.start(config)
        self.show_error(None)
        self._lr_sent = config.lr
        self.progress.max, self.progress.value = registry.get(config.strategy).length(config), 0
        self.run = launch(config, echo=False)
        self.pause_button.description, self.pause_button.icon = "Pause", "pause"
        self._set_buttons(live=True)
        self.dashboard = Dashboard(self.run)
        self.dashboard.on_refresh(self._on_refresh)
        self.dashboard_box.children = [self.dashboard.widget]
        return self.run

    def toggle_pause(self) -> None:
        if self.run is None or not self.run.live:
            return
        if self.pause_button.description == "Pause":
            self.run.pause()
            self.pause_button.description, self.pause_button.icon = "Resume", "play"
        else:
            self.run.resume()
            self.pause_button.description, self.pause_button.icon = "Pause", "pause"

    def stop(self) -> None:
        if self.run is not None and self.run.live:
            self.run.stop()
            self.show_error(None)  # a refusal about the run that was going is no longer news
            if self.dashboard is not None:
                self.dashboard.join(5)  # its last refresh shows the stopped run

    def close(self) -> None:
        """Stop the run, if any, and the dashboard."""
        self.stop()
        if self.dashboard is not None:
            self.dashboard.close()
        self.widget.close()

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)

    # ---- widget plumbing ---------------------------------------------------------
    def _add_field(self, name: str, hint: Widget) -> None:
        widget = fields.make(name, hint, getattr(self.base, name))
        widget.observe(lambda _: self._validate(), "value")
        if name in ("world_size", "strategy"):
            widget.observe(lambda _: self._relayout(), "value")
        knob = registry.knob(name)
        if knob is not None and knob.live:
            widget.observe(lambda _: self._send_knob(name), "value")
        widget.add_class(f"ddlkit-{name}")  # a handle for browser tests and custom CSS
        self.fields[name], self.hints[name] = widget, hint

    def _show_knobs(self) -> None:
        own = fields.fields_of(self.base.for_strategy(self.fields["strategy"].value))
        for name, hint in own:
            if name not in self.fields:
                self._add_field(name, hint)
        self.knob_box.children = [self.fields[name] for name, _ in own]
        self._validate()

    def _validate(self) -> None:
        problem = self.check()
        live = self.run is not None and self.run.live
        self.run_button.disabled = problem is not None or live
        if problem is not None:
            self.status.value = f"<b style='color:#b00'>invalid:</b> {html.escape(problem)}"
        elif not live:
            self.status.value = "ready" if self.run is None else self._describe(self.run)

    def _relayout(self) -> None:
        """A new world size or strategy during a run relaunches it (``ddlkit.view.relayout``)."""
        if self.run is not None and self.run.live:
            self.layout.changed(self.run, self._valid_config)

    def _valid_config(self) -> RunConfig:
        config = self.config()
        config.validate()
        return config

    def _straggler_changed(self, _change: dict[str, Any]) -> None:
        """Before a run: part of the config (validated). During one: sent live;
        moving the straggler to another rank frees the one it was on."""
        if self.run is None or not self.run.live:
            self._validate()
            return
        change = {rank: 1.0 for rank in self._slowdown_sent} | self._slowdown()
        if change and 0 <= self.slow_rank.value < self.run.world_size:
            self.run.control(slowdown=change)
            self._slowdown_sent = self._slowdown()

    def _send_knob(self, name: str) -> None:
        """A live knob changed while a run goes: the run takes it at a step (or round) all ranks agree on."""
        if self.run is None or not self.run.live:
            return
        try:
            self.run.control(**{name: fields.value_of(self.hints[name], self.fields[name])})
        except (ValueError, RuntimeError) as error:  # invalid, or the run ended meanwhile
            self.show_error(f"not changed: {error}")

    def _lr_moved(self, change: dict[str, Any]) -> None:
        """While a run goes, the slider steers its learning rate: sent at once if
        the last send is old, else by the next dashboard refresh (last value wins)."""
        if self.run is not None and self.run.live and time.monotonic() - self._last_lr_send > LR_SEND_S:
            self._send_lr()

    def _send_lr(self) -> None:
        with self._lr_lock:
            lr = self.fields["lr"].value
            if self.run is None or not self.run.live or lr == self._lr_sent or self.check() is not None:
                return
            try:
                self.run.set_lr(lr)
            except RuntimeError:  # it ended meanwhile
                return
            self._lr_sent, self._last_lr_send = lr, time.monotonic()

    def _on_refresh(self, dashboard: Dashboard) -> None:
        run = dashboard.runs[0]
        if run is not self.run:
            return
        self._send_lr()
        self.layout.follow(run)
        self.progress.value = min(run.steps_done, self.progress.max)
        self.status.value = self._describe(run)
        if not run.live:
            self._set_buttons(live=False)
            if run.status == "failed":
                self.show_error(run.error or "failed")

    def _describe(self, run: Run) -> str:
        text = f"run <code>{run.id}</code>: <b>{run.status}</b>, step {run.steps_done}/{self.progress.max}"
        rate = self.dashboard.data[0].samples_per_s() if self.dashboard is not None else math.nan
        return text + ("" if math.isnan(rate) else f", {rate:,.0f} samples/s")

    def _set_buttons(self, live: bool) -> None:
        self.run_button.disabled = live or self.check() is not None
        self.pause_button.disabled = not live
        self.stop_button.disabled = not live

    def show_error(self, text: str | None) -> None:
        self.error.value = (
            ""
            if text is None
            else (
                f"<pre style='color:#b00;white-space:pre-wrap;max-height:20em;overflow:auto'>{html.escape(text)}</pre>"
            )
        )
        self.error.layout.display = "none" if text is None else None
