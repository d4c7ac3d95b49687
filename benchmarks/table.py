"""One row of the performance table, and the table printed.

Every benchmark module exposes ``rows(quick=False) -> list[dict]``: each
row a measure, ddlkit's figure, the anchor's figure from the same run, their
ratio, the aim (``"<= 1.02"``, ``">= 1.5"``, or ``None``: shown, not aimed at)
and the anchor's name. ``python -m benchmarks`` prints them all as one table.
"""

from __future__ import annotations

import math
from typing import Any, TextIO


def row(measure: str, ours: float, anchor: float | None, anchor_name: str, aim: str | None = None) -> dict[str, Any]:
    """A table row; ``ratio`` is ours / anchor (None without an anchor)."""
    ratio = ours / anchor if anchor not in (None, 0) and not math.isnan(anchor) else None  # type: ignore[arg-type]
    return {
        "measure": measure,
        "ddlkit": ours,
        "anchor": anchor,
        "ratio": ratio,
        "aim": aim,
        "anchor_name": anchor_name,
    }


def met(r: dict[str, Any]) -> bool | None:
    """Whether the row's ratio meets its aim (None: no aim, or no ratio)."""
    if r["aim"] is None or r["ratio"] is None:
        return None
    sign, _, bound = r["aim"].partition(" ")
    return r["ratio"] <= float(bound) if sign == "<=" else r["ratio"] >= float(bound)


def number(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"


def print_table(rows: list[dict[str, Any]], out: TextIO | None = None) -> None:
    """The rows as one fixed-width table (``aim`` marked ok/MISSED)."""
    width = max([len(r["measure"]) for r in rows] + [7])
    lines = [f"{'measure':<{width}}  {'ddlkit':>10}  {'anchor':>10}  {'ratio':>7}  {'aim':>8}  {'':6}  anchor"]
    for r in rows:
        verdict = {True: "ok", False: "MISSED", None: ""}[met(r)]
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.3f}"
        lines.append(
            f"{r['measure']:<{width}}  {number(r['ddlkit']):>10}  {number(r['anchor']):>10}  {ratio:>7}  "
            f"{r['aim'] or '':>8}  {verdict:6}  {r['anchor_name']}"
        )
    print("\n".join(lines), file=out)
