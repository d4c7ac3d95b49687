"""Strategies: one file per parallelism.

Each file registers a ``ddlkit.registry.StrategySpec``: its name, its knobs,
its layout rule, its data-parallel size, whether and how it checkpoints, and
how to build the object that takes one rank's steps (the shape the rank loop
expects is ``ddlkit.rank.strategy.Strategy``). The registry imports every
module here, so adding a parallelism is adding one file.

``sharding.py`` and ``stages.py`` are no strategies: what several of them share.
"""
