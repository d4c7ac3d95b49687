"""What a run may ask of this machine and of its data, checked before anything
starts: bounds that a value alone cannot say (``RunConfig.validate`` calls these).

- Ranks against devices. On GPUs, one rank per GPU. On CPU, ranks may share
  cores, but past ``RANKS_PER_CORE`` per core they mostly wait for one
  (timings and speedups then say little) and a typo like ``world_size=10**6``
  would start a million processes: more needs ``oversubscribe=True``, and even
  then every rank's interpreter (``RANK_BYTES``) must fit in the free memory.
- Threads per rank: at most the cores.
- The global batch (``batch_size`` times the data-parallel replicas) must fit
  in the dataset: a step never takes a sample twice.

>>> check_batch(batch_size=64, replicas=2, dataset="digits", seq_len=32)
>>> check_batch(batch_size=10**9, replicas=2, dataset="digits", seq_len=32)
Traceback (most recent call last):
...
ValueError: batch_size=1000000000 is invalid: the global batch (batch_size x 2 data-parallel replicas) ...
"""

from __future__ import annotations

import os

from .data import dataset_size

RANKS_PER_CORE = 4  # on CPU without oversubscribe
RANK_BYTES = 300 * 2**20  # one rank's interpreter with torch and accelerate (~0.3 GiB resident, measured)


def cpu_cores() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def available_memory() -> int | None:
    """Bytes of memory available for new processes (Linux), or None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def check_device(device: str, resolved: str, world_size: int, strategy: str, cpu_only: bool) -> None:
    """A CUDA device exists when asked for, the strategy runs on it, one rank per GPU."""
    if device == "cpu":
        return
    import torch  # deferred: config stays cheap to import

    gpus = torch.cuda.device_count()
    if device == "cuda" and gpus == 0:
        raise ValueError("device='cuda' is invalid: no CUDA device is visible; valid here: 'cpu' or 'auto'")
    if resolved == "cuda" and cpu_only:
        raise ValueError(
            f"strategy={strategy!r} is invalid on device='cuda': it runs on CPU processes "
            "(any-source recv, shared memory); valid: device='cpu'"
        )
    if resolved == "cuda" and world_size > gpus:
        raise ValueError(
            f"world_size={world_size} is invalid on device={device!r}: "
            f"only {gpus} GPU(s) are visible; valid: 1..{gpus}, or device='cpu'"
        )


def check_ranks(world_size: int, resolved: str, oversubscribe: bool, threads: int | None) -> None:
    """On CPU: at most ``RANKS_PER_CORE`` ranks a core unless ``oversubscribe``,
    never more than the memory holds; threads at most the cores."""
    cores = cpu_cores()
    if threads is not None and threads > cores:
        raise ValueError(f"threads={threads} is invalid: this machine has {cores} CPU core(s); valid: 1..{cores}")
    if resolved != "cpu":
        return
    memory = available_memory()
    most = memory // RANK_BYTES if memory is not None else None  # processes the free memory holds
    shared = RANKS_PER_CORE * cores
    if world_size > shared and not oversubscribe:
        raise ValueError(
            f"world_size={world_size} is invalid here: this machine has {cores} CPU core(s), and past "
            f"{RANKS_PER_CORE} ranks a core they mostly wait for one (timings say little); valid: 1..{shared}, "
            f"or set oversubscribe=True to run more anyway (up to {most or 'what memory holds'} here)"
        )
    if memory is not None and most is not None and world_size > most:
        raise ValueError(
            f"world_size={world_size} is invalid: every rank is a process holding about "
            f"{RANK_BYTES / 2**30:.1f} GiB, and {memory / 2**30:.1f} GiB of memory is available: valid 1..{most}"
        )


def check_batch(batch_size: int, replicas: int, dataset: str, seq_len: int) -> None:
    """The global batch fits in one epoch of the dataset."""
    samples = dataset_size(dataset, seq_len)
    if batch_size * replicas > samples:
        raise ValueError(
            f"batch_size={batch_size} is invalid: the global batch (batch_size x {replicas} data-parallel "
            f"replicas) must fit in the {samples} samples of dataset={dataset!r}"
            + (f": valid 1..{samples // replicas}" if samples >= replicas else f" (seq_len={seq_len} leaves so few)")
        )
