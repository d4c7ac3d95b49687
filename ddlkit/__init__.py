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

__all__ = ["RunConfig", "launch", "log", "Run", "RunFailed", "Result", "load_run"]
__version__ = "0.1.0"
