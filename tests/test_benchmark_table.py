"""The performance table's pieces (``python -m benchmarks``): rows, aims, the
printed table, and every benchmark module exposing ``rows(quick)``. Running the
benchmarks is no test (they take minutes and time a shared machine)."""

from __future__ import annotations

import ast
import io
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


@pytest.fixture
def table(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import table

    return table


def test_a_row_carries_both_figures_their_ratio_and_the_aim(table):
    r = table.row("step time (ms)", 2.856, 2.8, "bare accelerate DDP loop", "<= 1.02")
    assert r == {
        "measure": "step time (ms)",
        "ddlkit": 2.856,
        "anchor": 2.8,
        "ratio": pytest.approx(1.02),
        "aim": "<= 1.02",
        "anchor_name": "bare accelerate DDP loop",
    }
    assert json.loads(json.dumps(r))["ratio"] == pytest.approx(1.02)
    assert table.met(r) is True
    assert table.met(table.row("x", 2.9, 2.8, "a", "<= 1.02")) is False
    assert table.met(table.row("x", 3.0, 2.0, "a", ">= 1.3")) is True
    assert table.met(table.row("x", 1.0, None, "not installed")) is None  # no anchor, no ratio


def test_the_printed_table_has_one_line_a_row_with_its_verdict(table):
    out = io.StringIO()
    table.print_table(
        [table.row("step time (ms)", 2.9, 2.8, "bare loop", "<= 1.02"), table.row("lost", 0.0, 0.0, "10 logged")],
        out,
    )
    lines = out.getvalue().splitlines()
    assert lines[0].split() == ["measure", "ddlkit", "anchor", "ratio", "aim", "anchor"]
    assert lines[1].split() == ["step", "time", "(ms)", "2.9", "2.8", "1.036", "<=", "1.02", "MISSED", "bare", "loop"]
    assert lines[2].split() == ["lost", "0", "0", "-", "10", "logged"]


def test_every_benchmark_module_gives_rows_and_the_table_runs_them_all():
    main = ast.parse((BENCHMARKS / "__main__.py").read_text())
    listed = next(
        ast.literal_eval(node.value)
        for node in main.body
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "MODULES"
    )
    modules = {p.stem for p in BENCHMARKS.glob("*.py")} - {"__init__", "__main__", "table"}
    assert set(listed) == modules  # a new benchmark joins the table
    for name in modules:
        tree = ast.parse((BENCHMARKS / f"{name}.py").read_text())
        rows = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "rows"]
        assert rows, f"benchmarks/{name}.py has no rows()"
        assert rows[0].args.args[0].arg == "quick", f"benchmarks/{name}.py: rows(quick=False, ...)"


def test_the_package_is_ours_not_the_one_opacus_installs():
    sys.path.insert(0, str(BENCHMARKS.parent))
    try:
        sys.modules.pop("benchmarks", None)
        import benchmarks

        assert Path(benchmarks.__file__).parent == BENCHMARKS
    finally:
        sys.path.remove(str(BENCHMARKS.parent))
        sys.modules.pop("benchmarks", None)
