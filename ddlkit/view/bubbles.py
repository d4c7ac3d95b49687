"""Each pipeline schedule's bubble from its published formula, and which
formula a timeline's spans call for.

Times are per stage chunk and micro-batch: ``F`` the forward, ``B`` the
input-gradient backward (I) and ``W`` the weight-gradient backward, so a
whole backward costs B + W (the Zero Bubble paper's notation). Each rank
works v*m*(F+B+W) per step; the idle time per rank is, for p ranks:

==================  ============================  =============================================
schedule            idle time per rank            source
==================  ============================  =============================================
gpipe, 1f1b         (p-1)(F+B+W)                  GPipe; Narayanan et al. 2021 (PipeDream-Flush)
interleaved,        (p-1)(F+B+W), chunks of 1/v   Narayanan et al. 2021 (interleaved 1F1B);
looped_bfs          of the model: (p-1)/(vm+p-1)  Lamy-Poirier 2023 (breadth-first, same bubble)
interleaved_zb      (p-1)(F+B-W)                  Qi et al. 2024 ZB-H1 / ZB1P; DualPipe's table
                                                  (p-1)(F+B'-2W) with B' = B+W the whole backward
zbv                 (p-1)(F+B-2W)                 Qi et al. 2024 ZB-V: none beyond the fill when
                                                  F = B = W
dualpipev           (p-1)(F&B+B'-3W)              DeepSeek-V3 (DualPipe, PP/2 = p ranks); F&B: an F
                                                  overlapped with a B', here run one after the
                                                  other: F+B'
==================  ============================  =============================================

No schedule idles less than the fill, though: the last rank waits (p-1)
forwards for its first input, so the idle time is at least (p-1)F. torch's
ZB-V order idles exactly that at F = B = W (its action lists replayed with
unit costs, and measured), where the formula alone would say 0.
The idle fraction is idle / (idle + v*m*(F+B+W)).

>>> round(theory("1f1b", p=2, m=4), 3), round(theory("interleaved", p=2, m=4, v=2), 3)
(0.2, 0.111)
>>> round(theory("interleaved_zb", p=2, m=4, v=2), 3), round(theory("zbv", p=2, m=4, v=2), 3)
(0.04, 0.04)
"""

from __future__ import annotations

import pandas as pd

ONE_STAGE = ("gpipe", "1f1b")


def idle_time(schedule: str, p: int, F: float, B: float, W: float) -> float:
    """Idle time per rank and step (same units as F, B, W); see the module table."""
    whole = B + W
    idle = {
        "gpipe": F + whole,
        "1f1b": F + whole,
        "interleaved": F + whole,
        "looped_bfs": F + whole,
        "interleaved_zb": F + whole - 2 * W,
        "zbv": F + B - 2 * W,
        "dualpipev": (F + whole) + whole - 3 * W,
    }
    if schedule not in idle:
        raise ValueError(f"schedule={schedule!r} is invalid: valid values are {list(idle)}")
    return max(p - 1, 0) * max(idle[schedule], F)  # never below the fill


def theory(
    schedule: str, p: int, m: int, v: int | None = None, F: float = 1.0, B: float = 1.0, W: float = 1.0
) -> float:
    """The idle fraction of ``schedule`` with ``p`` ranks, ``m`` micro-batches,
    ``v`` stages per rank (default: the schedule's own) and per-chunk times
    ``F``, ``B`` (input gradient) and ``W`` (weight gradient).

    >>> round(theory("gpipe", p=4, m=8), 3), round(theory("dualpipev", p=2, m=4), 3)
    (0.273, 0.077)
    """
    v = v if v is not None else (1 if schedule in ONE_STAGE else 2)
    idle = idle_time(schedule, p, F, B, W)
    return idle / (idle + v * m * (F + B + W))


def schedule_of(table: pd.DataFrame) -> str:
    """The schedule whose formula fits a timeline's spans (one row per span):
    the formulas tell apart one stage per rank, two looped, a split backward,
    and a V (rank 0 holds the last stage); gpipe/1f1b and interleaved/looped_bfs
    share theirs.

    >>> spans = pd.DataFrame({"rank": [0, 0, 1, 1], "stage": [0, 3, 1, 2], "phase": ["forward", "weight"] * 2})
    >>> schedule_of(spans)
    'zbv'
    """
    stages = table.groupby("rank")["stage"].unique()
    last = table["stage"].max()
    phases = set(table["phase"])
    splits = bool(phases & {"input", "weight"})
    if max(len(s) for s in stages) == 1:
        return "1f1b"
    if last in set(stages.get(0, [])):  # a V: the last stage sits beside the first
        return "dualpipev" if "backward" in phases else "zbv"
    return "interleaved_zb" if splits else "interleaved"
