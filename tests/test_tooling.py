"""The code is as clean as its tools say: ruff (lint and format, notebooks'
cells linted too) and mypy over ddlkit/, configured in pyproject.toml."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def tool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=600)


def test_ruff_lints_the_code_and_the_notebooks_clean():
    lint = tool("ruff", "check", ".")
    assert lint.returncode == 0, lint.stdout + lint.stderr
    checked = tool("ruff", "check", "--show-files", ".").stdout.splitlines()
    notebooks = sorted(p.name for p in (REPO / "notebooks").glob("*.ipynb"))
    assert sorted(Path(line).name for line in checked if line.endswith(".ipynb")) == notebooks


def test_ruff_format_leaves_nothing_to_change():
    formatted = tool("ruff", "format", "--check", ".")
    assert formatted.returncode == 0, formatted.stdout + formatted.stderr


def test_mypy_finds_no_error_in_the_package():
    checked = tool("mypy")
    assert checked.returncode == 0, checked.stdout + checked.stderr
