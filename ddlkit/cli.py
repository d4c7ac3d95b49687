"""The command line: the same experiments as the notebook.

ddlkit run --strategy data --world-size 2 --steps 100
ddlkit run experiment.yaml --lr 0.1
ddlkit demo
ddlkit slurm experiment.yaml --nodes 4 --gpus-per-node 8
"""

from __future__ import annotations

import argparse
import difflib
import sys
import time
from typing import IO

from tqdm import tqdm

from . import registry, slurm
from .config import RunConfig
from .flags import add_field_flags, strategies_text, values
from .kernel.launch import launch
from .kernel.resume import find_resume_point, resume_folder
from .kernel.run import Run, RunFailed
from .view.figures import report as write_report

# Adam at 0.01 reaches its plateau (loss ~0.1) in about 100 of the 200 steps: the report shows a finished curve.
DEMO = RunConfig(
    strategy="data", world_size=2, model="mlp", dataset="digits", steps=200, batch_size=32, optimizer="adam", lr=0.01
)
PROGRESS_LINES = 10  # without a terminal: a line at every tenth of the steps, not a bar redrawn in place


def parser() -> argparse.ArgumentParser:
    """``ddlkit run`` has a flag for every config field, with its help, what is valid and its default."""
    top = argparse.ArgumentParser(prog="ddlkit", description="Distributed deep learning experiments.")
    commands = top.add_subparsers(dest="command", required=True)
    run_cmd = commands.add_parser(
        "run",
        help="run an experiment from flags and/or a YAML/JSON config",
        usage="ddlkit run [config.yaml] [--FIELD VALUE ...] [--resume RUN_FOLDER] [--report]",
        description="Run an experiment. Flags override the config file's values; "
        "every field is checked before anything starts.",
        epilog=strategies_text(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run_cmd.add_argument("config", nargs="?", help="experiment.yaml or .json; flags override its values")
    run_cmd.add_argument(
        "--resume",
        metavar="RUN_FOLDER",
        help="continue runs/<id> from its newest valid checkpoint (its config; flags override)",
    )
    run_cmd.add_argument("--report", action="store_true", help="also write runs/<id>/report.html")
    add_field_flags(run_cmd)
    demo_cmd = commands.add_parser("demo", help="a small data-parallel run, with an HTML report")
    demo_cmd.add_argument("--steps", type=int, default=DEMO.steps, help=f"optimizer steps (default {DEMO.steps})")
    slurm.add_parser(commands)
    return top


def main(argv: list[str] | None = None) -> int:
    top = parser()
    opts, unknown = top.parse_known_args(argv)
    if unknown:
        return _refuse(unknown_flags(unknown, top))
    try:
        if opts.command == "slurm":
            return slurm.command(opts)
        if opts.command == "demo":
            cfg, report = DEMO.replace(steps=opts.steps), True
        else:
            if opts.resume:
                cfg = RunConfig.load(resume_folder(opts.resume) / "config.json")
            else:
                cfg = RunConfig.load(opts.config) if opts.config else RunConfig()
            cfg, report = cfg.replace(**values(opts)), opts.report
        cfg.validate()
        if getattr(opts, "resume", None):
            find_resume_point(resume_folder(opts.resume))
    except (ValueError, OSError) as exc:
        return _refuse(str(exc))
    return _run(cfg, report, getattr(opts, "resume", None))


def unknown_flags(given: list[str], top: argparse.ArgumentParser) -> str:
    """What argparse did not know, with the nearest flags."""
    known = [option for action in _run_parser(top)._actions for option in action.option_strings]
    near = [m for flag in given for m in difflib.get_close_matches(flag.split("=")[0], known, n=1)]
    hint = f" (did you mean {', '.join(near)}?)" if near else ""
    return f"unrecognized arguments: {' '.join(given)}{hint}; see ddlkit run --help"


def _run_parser(top: argparse.ArgumentParser) -> argparse.ArgumentParser:
    commands = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    return commands.choices["run"]


def _refuse(message: str) -> int:
    print(f"ddlkit: error: {message}", file=sys.stderr)
    return 2


def _run(cfg: RunConfig, report: bool, resume: str | None = None) -> int:
    length = registry.get(cfg.strategy).length(cfg)  # steps, or a round-based strategy's rounds
    print(f"ddlkit: {cfg.strategy} parallel, {cfg.world_size} rank(s), {cfg.model} on {cfg.dataset}, {length} steps")
    terminal = sys.stderr.isatty()
    run = launch(cfg, echo=tqdm.write if terminal else print, resume=resume)
    try:
        follow(run, length, sys.stderr, bar=terminal)
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


def follow(run: Run, steps: int, stream: IO[str], bar: bool) -> None:
    """Progress while the run goes: a bar on a terminal; otherwise (output
    redirected to a file or a CI log) one line each time another tenth of the
    steps is done, instead of a bar's frames."""
    if bar:
        with tqdm(total=steps, unit="step", dynamic_ncols=True, file=stream) as progress:
            while run.live:
                progress.update(run.steps_done - progress.n)
                time.sleep(0.2)
            progress.update(run.steps_done - progress.n)
        return
    told = 0
    while True:
        live, done = run.live, run.steps_done
        tenth = done * PROGRESS_LINES // steps
        if tenth > told:
            told = tenth
            print(f"ddlkit: step {done}/{steps} ({100 * done // steps}%)", file=stream, flush=True)
        if not live:
            return
        time.sleep(0.2)


def format_summary(run: Run) -> str:
    width = max(len(k) for k in run.summary)
    lines = [f"{key:<{width}}  {value}" for key, value in run.summary.items()]
    return "\n".join(["", "summary", "-" * 40, *lines, f"{'folder':<{width}}  {run.path}"])


if __name__ == "__main__":
    sys.exit(main())
