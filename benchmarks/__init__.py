"""ddlkit's benchmarks: ratios against the anchors, side by side (``python -m benchmarks``).

A regular package: opacus installs a top-level ``benchmarks`` package of its own,
which would otherwise shadow this folder.
"""
