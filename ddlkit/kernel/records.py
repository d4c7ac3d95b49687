"""A run's folder: writing it while the run goes on, reading it back after.

``runs/<id>/run.json`` says what was launched (and which worker pids and
ports to check are gone), ``events.jsonl`` gets every event as it arrives
(one write per batch), ``summary.json`` is written when the run ends.
``load_run`` reads the same table back, for runs launched by ddlkit
(``events.jsonl``) and for ranks started by another launcher, which each
wrote ``events-rank<r>.jsonl``.

What the kernel holds and what the folder holds stay the same: a batch of
events joins the Run only once its lines are on disk. A write that fails
(disk full) is cut back to the last whole line and raises :class:`RecordError`,
and so does a log whose file was deleted under it (the folder removed): the
supervisor then ends the run, failed, naming the error.
"""

from __future__ import annotations

import errno
import json
import math
import os
import threading
import warnings
from pathlib import Path
from typing import Any

from .. import checkpoint
from ..files import open_private_fd, write_json
from .follow import read_meta, status_of
from .run import Run

STATUSES = ("done", "failed", "stopped")


class RecordError(RuntimeError):
    """The run's folder cannot be written (disk full, folder removed, no permission)."""


class RunLog:
    """The writer of one live run's folder."""

    def __init__(self, run: Run):
        self.run = run
        self.path = run.path / "events.jsonl"
        self._lock = threading.Lock()  # the supervisor's thread and Run.control (the kernel's) both append
        try:
            self._fd: int | None = open_private_fd(self.path, "a+")
            end_torn_line(self._fd)  # a resumed run's log may end in a line its old kernel never finished
        except OSError as exc:
            raise RecordError(f"cannot write {self.path}: {exc}") from exc

    def write_meta(self) -> None:
        run = self.run
        meta = {"id": run.id, "started": run.started, "world_size": run.world_size}
        try:  # every worker of every attempt and both ports, so that all can be checked gone
            write_json(run.path / "run.json", {**meta, "pids": run.pids, "ports": run.ports, **run.meta})
        except OSError as exc:
            raise RecordError(f"cannot write {run.path / 'run.json'}: {exc}") from exc

    def append(self, events: list[dict[str, Any]]) -> None:
        """Record events on disk, then in the Run (so both always hold the same)."""
        data = "".join(json.dumps(event) + "\n" for event in events).encode()
        with self._lock:
            if self._fd is None:
                raise RecordError(f"{self.path} is closed")
            end = os.fstat(self._fd).st_size
            try:
                write_all(self._fd, data)
                if os.fstat(self._fd).st_nlink == 0:  # written into a file that no longer has a name
                    raise FileNotFoundError(errno.ENOENT, "the file was deleted (was the run folder removed?)")
            except OSError as exc:
                try:
                    os.ftruncate(self._fd, end)  # no torn line: the log ends with the last whole batch
                except OSError:
                    pass
                raise RecordError(f"cannot write {self.path}: {exc}") from exc
            self.run.record(events)

    def close(self, summary: dict[str, Any]) -> None:
        """Write ``summary.json`` and close the log; the log is closed even if the summary fails."""
        try:
            write_json(self.run.path / "summary.json", summary)
        except OSError as exc:
            raise RecordError(f"cannot write {self.run.path / 'summary.json'}: {exc}") from exc
        finally:
            with self._lock:
                if self._fd is not None:
                    os.close(self._fd)
                    self._fd = None


def write_all(fd: int, data: bytes) -> None:
    """``os.write`` may write part of a buffer (a nearly full disk): go on until all is written or it fails."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def end_torn_line(fd: int) -> None:
    """If the file ends in the middle of a line, end that line, so the next one starts whole."""
    size = os.fstat(fd).st_size
    if size and os.pread(fd, 1, size - 1) != b"\n":
        write_all(fd, b"\n")


def remove_unfinished(folder: Path) -> None:
    """What writers that died left half-written: ``step-N.tmp`` checkpoint
    folders and ``*.tmp`` files. Only when no rank of the run is left."""
    checkpoint.remove_unfinished(checkpoint.folder_of(folder))
    for leftover in folder.glob("*.tmp"):
        leftover.unlink(missing_ok=True)


# ---- reading back -------------------------------------------------------------
def load_run(path: str | os.PathLike[str]) -> Run:
    """Read a run's folder back: the same metrics table, events and summary.

    A line that cannot be read (the torn last line of a disk that filled up or
    a kernel that was killed) is skipped with a warning; a folder that is not a
    run's raises one ValueError that says why.

    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> _ = (folder / "events-rank0.jsonl").write_text('{"type": "step", "rank": 0, "step": 0, "time": 1.0}\\n')
    >>> load_run(folder).metrics["step"].tolist()
    [0]
    >>> load_run(tempfile.mkdtemp())
    Traceback (most recent call last):
    ...
    ValueError: ... is not a run folder: it has no run.json, events.jsonl or events-rank<r>.jsonl
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a run folder (expected runs/<id>/)")
    if not (path / "events.jsonl").exists() and any(path.glob("events-rank*.jsonl")):
        return _load_rank_logs(path)
    meta = _read_meta(path)
    logs = [path / "events.jsonl"] if (path / "events.jsonl").exists() else []
    if not (path / "run.json").exists() and not logs:
        raise ValueError(f"{path} is not a run folder: it has no run.json, events.jsonl or events-rank<r>.jsonl")
    events = [event for log in logs for event in read_events(log) if event["type"] != "beat"]
    if "started" not in meta:
        events.sort(key=lambda e: e["time"])
    run = _run_of(path, meta, events)
    summary = _read_summary(path)
    if summary is not None:
        run.restore(summary)
    else:  # the kernel that ran it ended first, or another launcher ran it
        ranks_done = {e["rank"] for e in events if e.get("type") == "finished"}
        status = "done" if ranks_done and len(ranks_done) == run.world_size else "stopped"
        run.restore(run.summarise(status, events[-1]["time"] if events else run.started))
    return run


def _run_of(path: Path, meta: dict[str, Any], events: list[dict[str, Any]]) -> Run:
    """The Run of a folder's events, its world size from run.json or else from the ranks they name."""
    started = meta.get("started", events[0]["time"] if events else 0.0)
    world_size = meta.get("world_size", len({e["rank"] for e in events if isinstance(e.get("rank"), int)}))
    if world_size < 1:
        raise ValueError(f"{path} is not a run folder: neither run.json nor any event names a rank")
    run = Run(meta.get("id", path.name), path, world_size, started, meta)
    run.record(events)
    return run


def _load_rank_logs(path: Path) -> Run:
    """A folder that ranks of another launcher wrote: their ``events-rank<r>.jsonl``, merged in time order."""
    meta = read_meta(path)
    logs = sorted(path.glob("events-rank*.jsonl"))  # each read as events.jsonl is: torn lines skipped, with why
    events = sorted((e for log in logs for e in read_events(log) if e["type"] != "beat"), key=lambda e: e["time"])
    run = _run_of(path, meta, events)
    status, error = status_of(events, run.world_size)
    summary = run.summarise(status or "stopped", events[-1]["time"] if events else run.started)
    run.restore({**summary, "error": error} if error else summary)
    return run


def read_events(log: Path) -> list[dict[str, Any]]:
    """The events of one JSONL log. Lines that are not events are skipped with
    a warning; a file with no event at all but other lines is not an event log."""
    lines = log.read_bytes().split(b"\n")
    torn = lines.pop() if lines else b""  # the last line, if the file does not end with a newline
    events, bad = [], []
    for number, line in enumerate(lines, 1):
        event = _event(line)
        if event is not None:
            events.append(event)
        elif line.strip():
            bad.append(number)
    if bad and not events:
        raise ValueError(f"{log.parent} is not a run folder: {log.name} holds no events (line 1 is not one)")
    if bad:
        warnings.warn(f"{log}: skipped {len(bad)} line(s) that are not events (lines {bad[:10]})", stacklevel=3)
    if torn.strip():
        event = _event(torn)
        if event is None:
            warnings.warn(f"{log}: skipped its torn last line (disk full or the kernel killed mid-write)", stacklevel=3)
        else:
            events.append(event)
    return events


def _event(line: bytes) -> dict[str, Any] | None:
    """The event on one line, or None if it is not one ddlkit could have written."""
    try:
        event = json.loads(line)
    except ValueError:  # also UnicodeDecodeError
        return None
    if not (isinstance(event, dict) and isinstance(event.get("type"), str) and _number(event.get("time"))):
        return None
    if "rank" in event and not _integer(event["rank"]):
        return None
    if event["type"] in ("step", "finished", "error") and "rank" not in event:
        return None
    if event["type"] == "step" and not _integer(event.get("step")):
        return None
    if event["type"] in ("restart", "layout") and not _integer(event.get("from_step")):
        return None
    if event["type"] == "layout" and not _integer(event.get("world_size")):
        return None
    return event


def _read_meta(path: Path) -> dict[str, Any]:
    file = path / "run.json"
    if not file.exists():
        return {}
    try:
        meta = json.loads(file.read_bytes())
    except ValueError as exc:
        raise ValueError(f"{path} is not a run folder: run.json is not JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path} is not a run folder: run.json holds a {type(meta).__name__}, not a run's record")
    for key, check in (("started", _number), ("world_size", _integer), ("id", lambda v: isinstance(v, str))):
        if key in meta and not check(meta[key]):
            raise ValueError(f"{path} is not a run folder: run.json has {key}={meta[key]!r}")
    return meta


def _read_summary(path: Path) -> dict[str, Any] | None:
    file = path / "summary.json"
    if not file.exists():
        return None
    try:
        summary = json.loads(file.read_bytes())
    except ValueError:
        summary = None
    if isinstance(summary, dict) and summary.get("status") in STATUSES:
        return summary
    warnings.warn(f"{file} is not a run summary: ignored, the summary is made again from the events", stacklevel=3)
    return None


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
