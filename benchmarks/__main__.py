"""Every benchmark in benchmarks/ as one performance table.

    python -m benchmarks [--quick] [--json PATH] [--only overhead log_burst ...]

Each module's ``rows(quick)`` runs its side-by-side measurements (ddlkit and
its anchor in the same run) and returns table rows (``benchmarks/table.py``);
they are printed as one table, and written as JSON with ``--json``. The
defaults are small so that the whole table takes minutes on a 2-core machine;
each module's own command line (``python benchmarks/<name>.py --help``) runs
it larger and prints more detail. Timings on a shared machine move with its
load: the line above the table gives the load average, compare rows of one run.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))  # the modules import each other by name, as when run as scripts

from table import print_table  # noqa: E402

MODULES = ("overhead", "launch_latency", "log_burst", "dashboard_refresh", "async_ps", "load_balancing",
           "model_parallel", "communication", "federated")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the smallest sizes: a check of the table, not figures")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    parser.add_argument("--only", nargs="+", choices=MODULES, help="these benchmarks only")
    opts = parser.parse_args(argv)
    rows, seconds = [], {}
    load = os.getloadavg()
    for name in opts.only or MODULES:
        started = time.perf_counter()
        for r in importlib.import_module(name).rows(quick=opts.quick):
            rows.append({"benchmark": name, **r})
        seconds[name] = round(time.perf_counter() - started, 1)
        print(f"{name}: {seconds[name]} s", file=sys.stderr)
    torch_version = importlib.import_module("torch").__version__
    print(
        f"\n{len(os.sched_getaffinity(0))} cores, load average {load[0]:.1f} before and "
        f"{os.getloadavg()[0]:.1f} after, "
        f"torch {torch_version}{', --quick' if opts.quick else ''}\n"
    )
    print_table(rows)
    if opts.json:
        meta = {"cores": len(os.sched_getaffinity(0)), "load_before": load, "load_after": os.getloadavg(),
                "torch": torch_version, "quick": opts.quick, "seconds": seconds}  # fmt: skip
        Path(opts.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
