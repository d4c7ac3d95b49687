"""How ddlkit writes the records of a run: privately, and so that a reader (or a
crash) never sees half of a file.

Private: a run folder holds weights, checkpoints, events and logs, so every
folder ddlkit creates is 0700 and every file 0600, whatever the umask, unless
the environment variable ``DDLKIT_RUN_MODE`` asks for more (``750`` lets the
group read runs, ``755`` everyone; files get the same bits without execute).
Nobody but the owner may ever write (docs/security.md).

Whole: write to ``<name>.tmp``, flush, fsync, rename over the final name. One
helper for every record: run.json and summary.json (JSON), final states and
returned values (torch tensors), checkpoint files.

>>> import tempfile
>>> folder = Path(tempfile.mkdtemp())
>>> write_json(folder / "a.json", {"x": 1})
>>> (folder / "a.json").read_text()
'{\\n  "x": 1\\n}'
>>> oct((folder / "a.json").stat().st_mode & 0o777)
'0o600'
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

MODE_VARIABLE = "DDLKIT_RUN_MODE"
PRIVATE = 0o700


def run_modes() -> tuple[int, int]:
    """(folder mode, file mode) for what ddlkit writes, from ``DDLKIT_RUN_MODE``.

    >>> [oct(mode) for mode in run_modes()]  # not set: private
    ['0o700', '0o600']
    """
    text = os.environ.get(MODE_VARIABLE, "").strip()
    if not text:
        return PRIVATE, PRIVATE & 0o666
    try:
        mode = int(text, 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o777 or mode & PRIVATE != PRIVATE or mode & 0o022:
        raise ValueError(
            f"{MODE_VARIABLE}={text!r} is invalid: give the octal mode of run folders, with every right for "
            "you and none to write for anyone else: 700 (the default, private), 750 (your group may read) "
            "or 755 (everyone on this machine may read)"
        )
    return mode, mode & 0o666


def make_dir(path: Path, exist_ok: bool = True) -> Path:
    """Create folder ``path`` (and any missing parents) with the run folder mode."""
    folder_mode, _ = run_modes()
    missing = [p for p in (path, *path.parents) if not p.exists()]
    if not exist_ok and path not in missing:
        raise FileExistsError(f"{path} exists already")
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=folder_mode & PRIVATE)  # never wider than asked, even for a moment
        except FileExistsError:  # made meanwhile by another rank: theirs to set
            if folder == path and not exist_ok:
                raise
            continue
        os.chmod(folder, folder_mode)  # exactly, whatever the umask
    return path


def check_own_dir(path: Path) -> Path:
    """``path`` if it is a folder of this user's, else a PermissionError (a run
    folder named from outside may have been made by someone else)."""
    info = path.stat()
    if not path.is_dir() or info.st_uid != os.geteuid():
        raise PermissionError(f"{path} is not a folder of this user's (uid {info.st_uid}): refusing to write there")
    return path


def open_private_fd(path: Path, mode: str = "wb") -> int:
    """A descriptor to write ``path`` (``mode``: w, wb, a or ab; a+ also reads)
    with the run file mode (a log appended to keeps its own). A symlink in its
    place is refused, never followed."""
    _, file_mode = run_modes()
    access = os.O_RDWR if "+" in mode else os.O_WRONLY
    flags = access | os.O_CLOEXEC | os.O_NOFOLLOW | (os.O_APPEND if "a" in mode else os.O_TRUNC)
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, file_mode & 0o600)
    except FileExistsError:
        fd = os.open(path, flags)
        if "a" in mode:  # a log that is there keeps its mode; a file written anew gets ours
            return fd
    os.fchmod(fd, file_mode)
    return fd


def open_private(path: Path, mode: str = "wb") -> IO[Any]:
    """``open_private_fd`` as a file object."""
    return os.fdopen(open_private_fd(path, mode), mode)


def set_file_mode(path: Path) -> None:
    """Give a file written by other means the run file mode."""
    os.chmod(path, run_modes()[1], follow_symlinks=False)


def write_synced(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Create ``path`` with ``write(file)`` and fsync it (no rename)."""
    with open_private(path, "wb") as f:
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
