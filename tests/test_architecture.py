"""The shape of the package, checked from its source: which way imports go,
no circles, no module reaching into another's private names, small files and
functions. Every import counts, also those inside functions (they used to
hide circles)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "ddlkit"
MAX_FILE_LINES = 300
MAX_FUNCTION_LINES = 60

# Which side of the process boundary a module is on, by folder.
SIDES = ("kernel", "rank", "view", "strategies")
FRONT = {"ddlkit", "ddlkit.cli", "ddlkit.worker"}  # entry points: they may import any side
# side -> the sides it may import. "shared" is every top-level module (config, data, models, ...).
ALLOWED = {
    "shared": {"shared"},
    "rank": {"shared", "rank"},
    "strategies": {"shared", "rank", "strategies"},
    "kernel": {"shared", "kernel"},
    "view": {"shared", "kernel", "view"},
}
# The one arrow beside the rules: a notebook-defined function is forked from the kernel, and the
# forked child runs the rank's entry (ddlkit.kernel.starter.fork_worker).
EXCEPTIONS = {("ddlkit.kernel.starter", "ddlkit.rank.entry")}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def side(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[1] in SIDES else "shared"


def imports_of(module: str) -> set[str]:
    """Every ddlkit module that ``module`` imports, anywhere in it."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:  # `from . import config` imports the module, not the package
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return {name for name in found if name in MODULES and name != module}


GRAPH = {module: imports_of(module) for module in MODULES}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_the_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_anywhere_in_the_package():
    assert cycles(GRAPH) == []


def test_imports_go_one_way_view_kernel_shared_and_rank_shared():
    wrong = [
        f"{module} ({side(module)}) imports {target} ({side(target)})"
        for module, targets in GRAPH.items()
        if module not in FRONT
        for target in targets
        if target not in FRONT and side(target) not in ALLOWED[side(module)] and (module, target) not in EXCEPTIONS
    ]
    assert wrong == []
    assert all(target not in FRONT or module in FRONT for module, targets in GRAPH.items() for target in targets)


def private_names_defined(module: str) -> set[str]:
    """Single-underscore names a module defines: functions, classes, attributes of self."""
    names = set()
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
            names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def test_no_module_uses_another_modules_private_names():
    own = {module: private_names_defined(module) for module in MODULES}
    everywhere = set().union(*own.values())
    wrong = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(("ddlkit", "")) and node.level:
                wrong += [f"{module} imports {a.name}" for a in node.names if a.name in everywhere]
            if isinstance(node, ast.Attribute) and node.attr in everywhere and node.attr not in own[module]:
                wrong.append(f"{module}:{node.lineno} uses .{node.attr}")
    assert wrong == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_files_and_functions_stay_small(module):
    text = MODULES[module].read_text()
    assert len(text.splitlines()) <= MAX_FILE_LINES, f"{module} has {len(text.splitlines())} lines"
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = (node.end_lineno or node.lineno) - node.lineno + 1
            assert length <= MAX_FUNCTION_LINES, f"{module}.{node.name} has {length} lines"


SEAMS = {"cfg", "run", "reporter", "accelerator", "controls", "starter", "ctx", "strategy"}


def test_the_seams_between_layers_are_annotated():
    bare = [
        f"{module}:{node.lineno} {node.name}({arg.arg})"
        for module, path in MODULES.items()
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        for arg in [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs]
        if arg.arg in SEAMS and arg.annotation is None
    ]
    assert bare == []
