"""Writing files so that a reader (or a crash) never sees half of one: write
to ``<name>.tmp``, flush, fsync, rename over the final name.

One helper for every record ddlkit writes: run.json and summary.json (JSON),
final states and returned values (torch tensors), checkpoint files.

>>> import tempfile
>>> folder = Path(tempfile.mkdtemp())
>>> write_json(folder / "a.json", {"x": 1})
>>> (folder / "a.json").read_text()
'{\\n  "x": 1\\n}'
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def write_synced(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Create ``path`` with ``write(file)`` and fsync it (no rename)."""
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def write_atomic(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Write then rename, so ``path`` is always whole or absent."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write_synced(tmp, write)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_torch(obj: Any, path: Path) -> None:
    """Tensors and containers, atomically (load with ``weights_only=True``)."""
    import torch  # deferred: config (which writes through this module) stays cheap to import

    write_atomic(path, lambda f: torch.save(obj, f))


def write_json(path: Path, data: dict[str, Any]) -> None:
    write_atomic(path, lambda f: f.write(json.dumps(data, indent=2, default=str).encode()))


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
