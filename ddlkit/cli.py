"""The command line: the same experiments as the notebook.

ddlkit run --strategy data --world-size 2 --steps 100
ddlkit run experiment.yaml --lr 0.1
ddlkit demo
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from typing import Any

from tqdm import tqdm

from . import registry
from .config import RunConfig, common_fields
from .kernel.launch import launch
from .kernel.resume import find_resume_point, resume_folder
from .kernel.run import Run, RunFailed
from .view.figures import report as write_report

DEMO = RunConfig(strategy="data", world_size=2, model="mlp", dataset="digits", steps=200, batch_size=32, lr=0.05)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ddlkit", description="Distributed deep learning experiments.")
    commands = parser.add_subparsers(dest="command", required=True)
    run_cmd = commands.add_parser("run", help="run an experiment from flags and/or a YAML/JSON config")
    run_cmd.add_argument("config", nargs="?", help="experiment.yaml or .json; flags override its values")
    flag_types = {"int": int, "float": float, "str": str, "int | None": int}
    for f in dataclasses.fields(RunConfig):
        if f.type in flag_types:
            run_cmd.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None, type=flag_types[f.type])
        elif f.type == "bool":  # e.g. --oversubscribe
            run_cmd.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None, action="store_true")
    for knob in registry.knob_names():  # a strategy's fields
        run_cmd.add_argument("--" + knob.replace("_", "-"), dest=knob, default=None, type=_flag_value)
    run_cmd.add_argument(
        "--resume",
        metavar="RUN_FOLDER",
        help="continue runs/<id> from its newest valid checkpoint (its config; flags override)",
    )
    run_cmd.add_argument("--report", action="store_true", help="also write runs/<id>/report.html")
    demo_cmd = commands.add_parser("demo", help="a small data-parallel run, with an HTML report")
    demo_cmd.add_argument("--steps", type=int, default=DEMO.steps)
    opts = parser.parse_args(argv)

    try:
        if opts.command == "demo":
            cfg, report = DEMO.replace(steps=opts.steps), True
        else:
            if opts.resume:
                cfg = RunConfig.load(resume_folder(opts.resume) / "config.json")
            else:
                cfg = RunConfig.load(opts.config) if opts.config else RunConfig()
            overrides = {
                name: getattr(opts, name)
                for name in [*common_fields(), *registry.knob_names()]
                if getattr(opts, name, None) is not None
            }
            cfg, report = cfg.replace(**overrides), opts.report
        cfg.validate()
        if getattr(opts, "resume", None):
            find_resume_point(resume_folder(opts.resume))
    except (ValueError, OSError) as exc:
        print(f"ddlkit: error: {exc}", file=sys.stderr)
        return 2
    return _run(cfg, report, getattr(opts, "resume", None))


def _run(cfg: RunConfig, report: bool, resume: str | None = None) -> int:
    length = registry.get(cfg.strategy).length(cfg)  # steps, or a round-based strategy's rounds
    print(f"ddlkit: {cfg.strategy} parallel, {cfg.world_size} rank(s), {cfg.model} on {cfg.dataset}, {length} steps")
    run = launch(cfg, echo=tqdm.write, resume=resume)
    try:
        _follow(run, length)
        run.wait()
    except KeyboardInterrupt:
        run.stop()
        print(f"ddlkit: run {run.id} stopped; what it recorded is in {run.path}", file=sys.stderr)
        return 130
    except RunFailed as exc:
        print(f"ddlkit: {exc}", file=sys.stderr)
        return 1
    finally:
        if report:
            print(f"report: {write_report(run, run.path / 'report.html')}")
    print(format_summary(run))
    return 0


def _flag_value(text: str) -> Any:
    """A knob's value from the command line: JSON (2, 1e-5, [2, 4], null, true), else the text itself (bsp)."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _follow(run: Run, steps: int) -> None:
    with tqdm(total=steps, unit="step", dynamic_ncols=True) as bar:
        while run.status in ("starting", "running"):
            bar.update(run.steps_done - bar.n)
            time.sleep(0.2)
        bar.update(run.steps_done - bar.n)


def format_summary(run: Run) -> str:
    width = max(len(k) for k in run.summary)
    lines = [f"{key:<{width}}  {value}" for key, value in run.summary.items()]
    return "\n".join(["", "summary", "-" * 40, *lines, f"{'folder':<{width}}  {run.path}"])


if __name__ == "__main__":
    sys.exit(main())
