"""Where legends go, for every figure of ddlkit: inside the top-right corner
of the panel they explain, never in the space above the panels where the
figure's title and the panels' titles are.

>>> legend_inside((0.0, 0.45), (0.55, 1.0))["x"], legend_inside((0.0, 0.45), (0.55, 1.0))["yanchor"]
(0.45, 'top')
"""

from __future__ import annotations

from typing import Any

LEGEND_FONT = 10


def legend_inside(x_domain: tuple[float, float], y_domain: tuple[float, float]) -> dict[str, Any]:
    """A legend in a panel's top-right corner (semi-transparent, small), given the panel's domains."""
    return {
        "x": x_domain[1],
        "y": y_domain[1],
        "xref": "paper",
        "yref": "paper",
        "xanchor": "right",
        "yanchor": "top",
        "bgcolor": "rgba(255,255,255,0.75)",
        "bordercolor": "rgba(0,0,0,0.15)",
        "borderwidth": 1,
        "font": {"size": LEGEND_FONT},
        "tracegroupgap": 2,
    }


def legends_per_panel(figure: Any, panels: list[tuple[int, int, list[dict[str, Any]]]]) -> None:
    """Add each panel's traces (row, col, traces) to a ``make_subplots`` figure,
    with a legend of its own in its corner when it has more than one trace."""
    for index, (row, col, traces) in enumerate(panels):
        name = "legend" if index == 0 else f"legend{index + 1}"
        shown = len(traces) > 1 and any(t.get("showlegend", True) for t in traces)
        for trace in traces:
            figure.add_trace({**trace, "legend": name, **({} if shown else {"showlegend": False})}, row, col)
        if shown:
            subplot = figure.get_subplot(row, col)
            figure.update_layout({name: legend_inside(subplot.xaxis.domain, subplot.yaxis.domain)})
