"""A run's folder: writing it while the run goes on, reading it back after.

``runs/<id>/run.json`` says what was launched (and which worker pids and
ports to check are gone), ``events.jsonl`` gets every event as it arrives
(flushed per batch), ``summary.json`` is written when the run ends.
``load_run`` reads the same table back, for runs launched by ddlkit
(``events.jsonl``) and for ranks started by another launcher, which each
wrote ``events-rank<r>.jsonl``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import IO, Any

from ..files import open_private, write_json
from .run import Run


class RunLog:
    """The writer of one live run's folder."""

    def __init__(self, run: Run):
        self.run = run
        self._events: IO[str] | None = open_private(run.path / "events.jsonl", "a")

    def write_meta(self) -> None:
        run = self.run
        write_json(
            run.path / "run.json",
            {
                "id": run.id,
                "started": run.started,
                "world_size": run.world_size,
                "pids": run.pids,
                "ports": run.ports,
                **run.meta,
            },
        )

    def append(self, events: list[dict[str, Any]]) -> None:
        """Record events in the Run and on disk."""
        self.run.record(events)
        if self._events is not None:
            self._events.write("".join(json.dumps(event) + "\n" for event in events))
            self._events.flush()

    def close(self, summary: dict[str, Any]) -> None:
        write_json(self.run.path / "summary.json", summary)
        if self._events is not None:
            self._events.close()
            self._events = None


def load_run(path: str | os.PathLike[str]) -> Run:
    """Read a run's folder back: the same metrics table, events and summary."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a run folder (expected runs/<id>/)")
    meta = json.loads((path / "run.json").read_text()) if (path / "run.json").exists() else {}
    logs = [path / "events.jsonl"] if (path / "events.jsonl").exists() else sorted(path.glob("events-rank*.jsonl"))
    events = [json.loads(line) for log in logs for line in log.read_text().splitlines() if line.strip()]
    events = [e for e in events if e.get("type") != "beat"]
    if "started" not in meta:
        events.sort(key=lambda e: e["time"])
    started = meta.get("started", events[0]["time"] if events else 0.0)
    world_size = meta.get("world_size", len({e["rank"] for e in events if "rank" in e}))
    run = Run(meta.get("id", path.name), path, world_size, started, meta)
    run.record(events)
    summary_path = path / "summary.json"
    if summary_path.exists():
        run.restore(json.loads(summary_path.read_text()))
    else:  # the kernel that ran it ended first, or another launcher ran it
        ranks_done = {e["rank"] for e in events if e.get("type") == "finished"}
        status = "done" if ranks_done and len(ranks_done) == world_size else "stopped"
        run.restore(run.summarise(status, events[-1]["time"] if events else started))
    return run
