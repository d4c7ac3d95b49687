"""Run ids: the names of run folders, ``runs/<id>/``.

ddlkit makes them from the time and a random part. A name that reaches a rank
from outside (the store that torchrun's agent hosts, which any local user can
write to, or ``TORCHELASTIC_RUN_ID``) becomes part of a path, so it is
accepted only if it cannot lead anywhere but a folder inside the runs folder.

>>> is_run_id(new_run_id())
True
>>> is_run_id("../../home/me/.ssh")
False
"""

from __future__ import annotations

import re
import secrets
import time

RUN_ID = re.compile(r"\d{8}-\d{6}-[0-9a-f]{6}")  # 20261124-221727-b63606
FOLDER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")  # one path component, never '.' or '..'


def new_run_id() -> str:
    """A fresh id: when, and six random hex digits."""
    return time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)


def is_run_id(value: str) -> bool:
    """True for an id in ddlkit's own format."""
    return RUN_ID.fullmatch(value) is not None


def check_folder_name(value: str, source: str) -> str:
    """``value`` if it is a plain folder name (letters, digits, '_', '.', '-'),
    else a ValueError naming where it came from."""
    if FOLDER_NAME.fullmatch(value) is None:
        raise ValueError(
            f"{source} is {value!r}, which cannot name a run folder: use letters, digits, '_', '.' and '-' "
            "(at most 128, starting with a letter or digit)"
        )
    return value
