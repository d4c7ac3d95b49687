"""How a run can end for whoever waits on it: a result, a failure, an interrupt."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class RunFailed(RuntimeError):
    """A rank raised, died or hung. The message names every rank's exit and
    carries the first real traceback (not a peer's 'connection reset')."""

    def __init__(self, message: str, run_id: str):
        super().__init__(message)
        self.run_id = run_id


class RunInterrupted(KeyboardInterrupt):
    """``run.wait()`` was interrupted (Ctrl-C, Jupyter's stop button) and the run
    stopped. IPython shows it as its one-line message, not as a traceback
    through threading internals.

    >>> RunInterrupted("run x was stopped by the interrupt")._render_traceback_()
    ['RunInterrupted: run x was stopped by the interrupt']
    """

    def _render_traceback_(self) -> list[str]:  # IPython's hook for how an exception is shown
        return [f"{type(self).__name__}: {self}"]


@dataclass
class Result:
    state_dict: dict[str, Any] | None  # full model state on CPU (built-in experiments)
    summary: dict[str, Any]
    returns: dict[int, Any] = field(default_factory=dict)  # what each rank's function returned, if anything
