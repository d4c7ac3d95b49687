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

from .. import common, registry
from ..config import RunConfig
from ..knobs import Widget
from ..network import PRESETS, name_of

# The common fields the panel shows, as its first two rows (widgets: ddlkit.common).
ROWS = (("strategy", "world_size", "model", "dataset"), ("batch_size", "steps", "lr"))
COMMON = {name: hint for row in ROWS for name in row if (hint := common.COMMON[name].widget) is not None}
NETWORK = Widget("choice", "network", options=tuple(PRESETS))  # a config's own dict joins the menu's options


def fields_of(cfg: RunConfig) -> list[tuple[str, Widget]]:
    """The strategy's own fields with a widget, for the panel's knob row (not
    those it derives: a pipeline's pp is its world size)."""
    spec = registry.get(cfg.strategy)
    derived = spec.derived(cfg)
    own = [(knob.name, knob.widget) for knob in spec.knobs if knob.widget is not None and knob.name not in derived]
    checkpoints = common.COMMON["checkpoint_every"].widget
    return own + ([("checkpoint_every", checkpoints)] if spec.checkpoint and checkpoints else [])


LABEL_PX_PER_CHAR = 7  # JupyterLab's widget label font, with a margin
INPUT_PX = 110  # what is left for the value: a number of 7 digits, or a choice's name


def names_of(cfg: RunConfig) -> list[str]:
    """The strategy's knobs the panel shows (a relaunch passes them on)."""
    return [name for name, _ in fields_of(cfg)]


def width_for(label: str) -> str:
    """A widget's CSS width: its label's, plus room to see and type the value
    (a fixed width left a long label's box ~10 px wide).

    >>> width_for("steps"), width_for("checkpoint every (0: off)")
    ('190px', '285px')
    """
    return f"{max(190, LABEL_PX_PER_CHAR * len(label) + INPUT_PX)}px"


def make(name: str, hint: Widget, value: Any) -> widgets.ValueWidget:
    """The widget for one field, showing ``value``. Numbers are plain text
    boxes, not bounded ones: a bounded box silently clamps a bad value (world
    size 0 became 1), this way the panel's validation shows the refusal."""
    shown = hint.none_as if value is None else value
    style, width = {"description_width": "initial"}, widgets.Layout(width=width_for(hint.label))
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
            step=1e-6,  # in log10: a typed or configured lr stays itself (at 0.05, typing 0.3 gave 0.316)
            readout_format=".3g",
            description=hint.label,
            continuous_update=True,
        )
    kind = widgets.IntText if hint.kind == "int" else widgets.FloatText
    return kind(value=shown, description=hint.label, style=style, layout=width)


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
