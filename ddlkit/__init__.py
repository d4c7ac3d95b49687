"""ddlkit: see distributed training happen, from a notebook.

Example (launching starts worker processes, so it is no doctest)::

    import ddlkit
    cfg = ddlkit.RunConfig(strategy="data", world_size=2, steps=20)
    run = ddlkit.launch(cfg, echo=False)   # returns at once
    run.wait(timeout=120).status           # 'done'
"""

from __future__ import annotations

import importlib
from typing import Any

from .config import RunConfig
from .kernel.follow import follow
from .kernel.forkserver import warm_up
from .kernel.launch import launch
from .kernel.records import load_run
from .kernel.run import Result, Run, RunFailed, RunInterrupted
from .rank.reporter import log

__all__ = [
    "RunConfig",
    "launch",
    "log",
    "Run",
    "RunFailed",
    "RunInterrupted",
    "Result",
    "load_run",
    "follow",
    "warm_up",
    "Dashboard",
    "ControlPanel",
    "sweep",
    "report",
    "figures",
    "timeline",
    "staleness",
    "federated",
    "costmodel",
    "balance",
]

# The view side, imported on first use: workers import ddlkit too, and need no plotly or widgets.
_LAZY = {
    "Dashboard": "view.dashboard",
    "ControlPanel": "view.control_panel",
    "sweep": "view.sweeps",
    "report": "view.figures",
}
_VIEW_MODULES = ("figures", "timeline", "staleness", "federated", "costmodel", "balance")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    if name in _VIEW_MODULES:
        return importlib.import_module(f"{__name__}.view.{name}")
    raise AttributeError(f"module 'ddlkit' has no attribute {name!r}")


__version__ = "0.1.0"
