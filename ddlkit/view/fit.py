"""Making a live figure fill the width of its output.

plotly's FigureWidget draws itself before the page has placed it, so at
plotly's default 700 px, and, as an anywidget, never hears that it was placed
(the resize hook it has is for classic widget views): a dashboard took ~60% of
the cell. :func:`filling` turns on plotly's ``responsive`` mode (it then fits
its container whenever the window says it resized) and puts beside the figure
an empty widget whose only job is to say so once the figure is placed,
whenever the output's width changes (a side panel opened or closed), and
whenever the figure is drawn at another width than its box's: a figure first
drawn before the page placed it (a run whose first events came within
milliseconds, from the warm starter) keeps 700 px as an explicit width, which
it then loses.
"""

from __future__ import annotations

from typing import Any

import anywidget
import ipywidgets as widgets

FIT_JS = """
export default {
  render({ el }) {
    let frame = null;
    const fit = () => {
      if (frame === null) {
        frame = requestAnimationFrame(() => { frame = null; window.dispatchEvent(new Event("resize")); });
      }
    };
    // A figure first drawn before the page placed it keeps plotly's default 700 px as an explicit
    // width, which a resize never changes. Whenever the box's drawing changes, a figure narrower than
    // its box loses that width (it never came from Python) and is refitted.
    const check = () => {
      const box = el.parentElement;
      const plot = box && box.querySelector(".js-plotly-plot");
      const svg = plot && plot.querySelector("svg.main-svg");
      if (svg && Math.abs(svg.getBoundingClientRect().width - box.getBoundingClientRect().width) > 2) {
        if (plot.layout) delete plot.layout.width;
        fit();
      }
    };
    const resized = new ResizeObserver(fit);
    const drawn = new MutationObserver(check);
    const watch = () => {
      if (!el.parentElement) return requestAnimationFrame(watch);
      resized.observe(el.parentElement);
      drawn.observe(el.parentElement, { childList: true, subtree: true });
    };
    watch();
    return () => { resized.disconnect(); drawn.disconnect(); };
  },
};
"""


class FitWidth(anywidget.AnyWidget):  # type: ignore[misc]
    """Empty: tells the page's responsive plots to fit their containers once placed and when resized."""

    _esm = FIT_JS


def filling(figure: Any) -> widgets.VBox:
    """``figure`` (a FigureWidget) in a box as wide as the output, fitting it.

    >>> import plotly.graph_objects as go
    >>> box = filling(go.FigureWidget())
    >>> box.children[0]._config["responsive"], box.layout.width
    (True, '100%')
    """
    figure._config = {**figure._config, "responsive": True}  # plotly's own window-resize handler refits it
    return widgets.VBox([figure, FitWidth()], layout=widgets.Layout(width="100%"))
