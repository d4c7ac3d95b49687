"""ddlkit: see distributed training happen, from a notebook.

>>> import ddlkit
>>> cfg = ddlkit.RunConfig(strategy="data", world_size=2, steps=20)
>>> run = ddlkit.launch(cfg, echo=False)   # returns at once
>>> run.wait(timeout=120).status
'done'
"""
from .config import RunConfig
from .launch import launch
from .reporter import log
from .run import Result, Run, RunFailed, load_run

__all__ = ["RunConfig", "launch", "log", "Run", "RunFailed", "Result", "load_run", "Dashboard", "ControlPanel",
           "sweep"]

# Imported on first use: workers import ddlkit too, and need no plotly or widgets.
_LAZY = {"Dashboard": ".dashboard", "ControlPanel": ".widgets", "sweep": ".sweeps"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'ddlkit' has no attribute {name!r}")

__version__ = "0.1.0"
