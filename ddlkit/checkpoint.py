"""Checkpoints: a run's whole training state at a step, written so that a crash
at any moment leaves either the previous checkpoint or the new one, never half
of one that gets loaded.

One checkpoint is a folder ``runs/<id>/checkpoints/step-000040/`` holding the
state files and a ``manifest.json`` (step, layout, and each file's size and
sha256). It is written as ``step-000040.tmp/``: files, fsync, the manifest last,
fsync, rename to its final name, fsync of the parent folder. A folder without a
manifest, or whose files do not match it (truncated, overwritten), is skipped
in favour of the previous one, with a message saying so.

Two layouts, chosen by the strategy's spec (``StrategySpec.checkpoint``):

- consolidated: rank 0 writes ``state.pt`` with the whole state (every rank of
  single/data holds a full replica). Any world size can resume from it.
- sharded: every rank writes ``rank<r>.pt`` with its own shard; resuming needs
  the same layout.

>>> import tempfile, torch
>>> root = Path(tempfile.mkdtemp())
>>> _ = save(root, 4, {"state.pt": {"w": torch.ones(2)}}, meta={"world_size": 1})
>>> found = latest(root)
>>> found.step, load_file(found.path / "state.pt")["w"].tolist()
(4, [1.0, 1.0])
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import IO, Any, Protocol

import torch
import torch.distributed as dist

from . import registry
from .config import RunConfig
from .files import fsync_dir, make_dir, open_private, write_synced

MANIFEST = "manifest.json"
CONSOLIDATED = "state.pt"


def folder_of(run_path: str | os.PathLike) -> Path:
    return Path(run_path) / "checkpoints"


def name_of(step: int) -> str:
    return f"step-{step:06d}"


def step_of(path: Path) -> int | None:
    """The step a checkpoint folder's name says (None: not a finished checkpoint's name).

    >>> step_of(Path("step-1000010")), step_of(Path("step-000040.tmp"))
    (1000010, None)
    """
    digits = path.name.removeprefix("step-")
    return int(digits) if path.name.startswith("step-") and digits.isdigit() else None


def finished(root: Path) -> list[Path]:
    """The finished checkpoint folders, newest step first. By the number: past
    step 999,999 the names grow a digit and no longer sort as strings."""
    named = [(step, path) for path in root.glob("step-*") if (step := step_of(path)) is not None]
    return [path for _, path in sorted(named, reverse=True)]


@dataclass
class Found:
    """The newest valid checkpoint, and the newer ones skipped (with why)."""

    path: Path
    step: int
    manifest: dict[str, Any]
    skipped: list[str] = field(default_factory=list)


def save(
    root: Path,
    step: int,
    files: dict[str, Any],
    meta: dict[str, Any],
    keep: int = 2,
    rank: int = 0,
    sharded: bool = False,
    barrier: Callable[[], object] | None = None,
) -> Path | None:
    """Write this rank's ``files`` ({name: object}) of the checkpoint at
    ``step`` (the next step to run). Every rank calls it; rank 0 finishes the
    checkpoint (manifest, rename) and keeps the newest ``keep``. With
    ``sharded`` every rank writes and ``barrier()`` (a collective) makes rank 0
    wait for all files before it writes the manifest."""
    tmp = root / (name_of(step) + ".tmp")
    final = root / name_of(step)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by an attempt that died while writing
        if not root.parent.is_dir():  # a run folder that was removed is not made again
            raise FileNotFoundError(f"{root.parent} is gone: no checkpoint is written there")
        make_dir(tmp, exist_ok=False)
    if sharded and barrier is not None:
        barrier()  # the folder exists before anyone writes into it
    try:
        for name, obj in files.items():
            write_synced(tmp / name, partial(_save, obj))
        if sharded and barrier is not None:
            barrier()  # every shard is on disk before the manifest vouches for it
        return _finish(root, tmp, final, step, sharded, meta, keep) if rank == 0 else None
    except BaseException:  # disk full, folder removed: no half-written checkpoint stays behind
        if rank == 0:  # its creator (a shard writer that fails ends the run; the kernel then removes it)
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def _finish(root: Path, tmp: Path, final: Path, step: int, sharded: bool, meta: dict[str, Any], keep: int) -> Path:
    """Rank 0: the manifest last, then the rename that makes the checkpoint exist."""
    entries = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(tmp.iterdir())}
    manifest = {"step": step, "layout": "sharded" if sharded else "consolidated", "files": entries, **meta}
    with open_private(tmp / MANIFEST, "w") as f:
        json.dump(manifest, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(tmp)
    shutil.rmtree(final, ignore_errors=True)  # a redone step's older copy
    os.replace(tmp, final)
    fsync_dir(root)
    _prune(root, keep)
    return final


def latest(root: Path, at_most: int | None = None, why: str = "") -> Found | None:
    """The newest checkpoint whose manifest and files check out, or None.
    ``at_most``: only a checkpoint of that step or earlier (``why`` says why, for the skipped list)."""
    skipped: list[str] = []
    for path in finished(root):
        step = step_of(path)
        if at_most is not None and step is not None and step > at_most:
            skipped.append(f"checkpoint {path.name} is not used: {why or f'newer than step {at_most}'}")
            continue
        problem = verify(path)
        if problem is None:
            manifest = json.loads((path / MANIFEST).read_text())
            return Found(path, int(manifest["step"]), manifest, skipped)
        skipped.append(f"checkpoint {path.name} is invalid ({problem}): skipped, never loaded")
    return None


def verify(path: Path) -> str | None:
    """None if the checkpoint is whole, else what is wrong with it."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return "no readable manifest: it was not finished"
    for name, entry in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        size = file.stat().st_size
        if size != entry["bytes"]:
            return f"{name} has {size} bytes, the manifest says {entry['bytes']}: truncated or overwritten"
        if _sha256(file) != entry["sha256"]:
            return f"{name} does not match its sha256 in the manifest: corrupt"
    return None


def load_file(path: Path) -> Any:
    """Tensors, numbers and containers only: ``weights_only`` never runs code from the file."""
    return torch.load(path, map_location="cpu", weights_only=True)


def rng_state() -> dict[str, Any]:
    """Every random generator the training loop may draw from (numpy's is not
    used while training: data order is a pure function of the step)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save(obj: Any, file: IO[bytes]) -> None:
    torch.save(obj, file)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _prune(root: Path, keep: int) -> None:
    for old in finished(root)[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    remove_unfinished(root)  # older attempts' half-written ones


def remove_unfinished(root: Path) -> list[Path]:
    """Remove the half-written checkpoints (``step-N.tmp``) of writers that
    died; call it only when no rank is writing. Returns what it removed."""
    unfinished = sorted(root.glob("step-*.tmp"))
    for path in unfinished:
        shutil.rmtree(path, ignore_errors=True)
    return unfinished


class Checkpointable(Protocol):
    """What a strategy whose spec sets ``checkpoint`` provides."""

    def checkpoint_state(self) -> dict[str, Any]: ...
    def load_checkpoint_state(self, state: dict[str, Any]) -> None: ...


class Checkpointer:
    """The rank loop's side: restore at start, save every ``checkpoint_every``
    steps and when stopped. The strategy's spec says the layout."""

    def __init__(self, cfg: RunConfig, strategy: Any, run_dir: Path, rank: int, world_size: int):
        self.cfg = cfg
        self.strategy: Checkpointable = strategy
        self.root = folder_of(run_dir)
        self.rank = rank
        self.world_size = world_size
        self.sharded = registry.get(cfg.strategy).checkpoint == "sharded"

    def restore(self, path: str | None) -> tuple[int, float | None]:
        """Load the checkpoint the kernel chose (``DDLKIT_RESUME``): the step to
        start at and the learning rate in force then (None: the config's)."""
        if not path:
            return 0, None
        state = load_file(Path(path) / (f"rank{self.rank}.pt" if self.sharded else CONSOLIDATED))
        self.strategy.load_checkpoint_state(state["strategy"])
        restore_rng(state["rng"])
        return int(state["step"]), state["lr"]

    def due(self, steps_done: int) -> bool:
        every = self.cfg.checkpoint_every
        return every is not None and steps_done > 0 and steps_done % every == 0

    def save(self, next_step: int, lr: float) -> Path | None:
        """Every rank calls it (a strategy may gather); returns the folder on rank 0."""
        strategy_state = self.strategy.checkpoint_state()
        files = {}
        if self.sharded or self.rank == 0:
            state = {"strategy": strategy_state, "rng": rng_state(), "step": next_step, "lr": lr}
            files[f"rank{self.rank}.pt" if self.sharded else CONSOLIDATED] = state
        meta = {"strategy": self.cfg.strategy, "world_size": self.world_size, "batch_size": self.cfg.batch_size}
        barrier = dist.barrier if dist.is_initialized() else None
        return save(self.root, next_step, files, meta, self.cfg.keep_checkpoints, self.rank, self.sharded, barrier)
