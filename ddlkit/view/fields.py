"""Widgets for config fields: the ControlPanel's inputs, built from the
``Widget`` hints that the common fields below and every strategy's knobs
(``ddlkit.registry``) carry.

>>> from ddlkit.config import RunConfig
>>> [name for name, _ in fields_of(RunConfig(strategy="ps"))]
['servers', 'sync', 'staleness_bound']
"""

from __future__ import annotations

import math
from typing import Any

import ipywidgets as widgets

from .. import registry
from ..config import DATASETS, MODELS, RunConfig
from ..knobs import Widget
from ..network import PRESETS, name_of

# The fields every experiment has, as the panel's first two rows.
COMMON = {
    "strategy": Widget("choice", "strategy"),  # its options: the registry's strategies
    "world_size": Widget("int", "world size", 1, 64),
    "model": Widget("choice", "model", options=MODELS),
    "dataset": Widget("choice", "dataset", options=DATASETS),
    "batch_size": Widget("int", "batch / rank", 1, 65_536),
    "steps": Widget("int", "steps", 1, 1_000_000),
    "lr": Widget("float", "lr", 1e-4, 1.0),  # a log slider
}
NETWORK = Widget("choice", "network", options=tuple(PRESETS))  # a config's own dict joins the menu's options
# Checkpoints make a run resizable live (0: none, the field's None).
CHECKPOINTS = Widget("int", "checkpoint every (0: off)", 0, 1_000_000, none_as=0)


def fields_of(cfg: RunConfig) -> list[tuple[str, Widget]]:
    """The strategy's own fields with a widget, for the panel's knob row."""
    spec = registry.get(cfg.strategy)
    own = [(knob.name, knob.widget) for knob in spec.knobs if knob.widget is not None]
    return own + ([("checkpoint_every", CHECKPOINTS)] if spec.checkpoint else [])


def make(name: str, hint: Widget, value: Any) -> widgets.ValueWidget:
    """The widget for one field, showing ``value``."""
    shown = hint.none_as if value is None else value
    style, width = {"description_width": "initial"}, widgets.Layout(width="190px")
    if hint.kind == "choice":
        options = registry.names() if name == "strategy" else list(hint.options)
        return widgets.Dropdown(value=shown, options=options, description=hint.label, style=style, layout=width)
    if hint.kind == "bool":
        return widgets.Checkbox(value=shown, description=hint.label, style=style, layout=width)
    if name == "lr":
        return widgets.FloatLogSlider(
            value=shown,
            base=10,
            min=math.log10(hint.low or 1e-4),
            max=math.log10(hint.high or 1.0),
            step=0.05,
            readout_format=".3g",
            description=hint.label,
            continuous_update=True,
        )
    kind = widgets.BoundedIntText if hint.kind == "int" else widgets.BoundedFloatText
    return kind(value=shown, min=hint.low, max=hint.high, description=hint.label, style=style, layout=width)


def value_of(hint: Widget, widget: widgets.ValueWidget) -> Any:
    """The config value a widget holds (its ``none_as`` back to None)."""
    value = widget.value
    return None if hint.none_as is not None and value == hint.none_as else value


def network_menu(network: Any) -> widgets.Dropdown:
    """The emulated network's menu (``ddlkit.network``): the presets, and the config's own dict if it has one."""
    options = [(name, name) for name in PRESETS]
    if not isinstance(network, str):
        options.append((name_of(network), network))
    menu = widgets.Dropdown(
        options=options,
        value=network,
        description="network",
        style={"description_width": "initial"},
        layout=widgets.Layout(width="190px"),
    )
    menu.add_class("ddlkit-network")  # a handle for browser tests and custom CSS
    return menu
