"""A strategy plugin that cannot be imported in a worker (as when a package it
needs is missing there): the kernel accepts the config, then every rank fails
while reading its config, before it could report anything through its loop."""

from __future__ import annotations

import os

from ddlkit.registry import StrategySpec, register
from ddlkit.strategies.data import DataParallel

NAME = "fails_in_workers"

if os.environ.get("DDLKIT_CHANNEL"):  # in a worker started by ddlkit
    raise ImportError("plugin_that_fails_in_workers needs a package that the workers lack")

register(StrategySpec(NAME, DataParallel, "data parallel, not importable in workers", module=__name__))
