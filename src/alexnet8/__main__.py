"""`python -m alexnet8 <stage> [--params params.yaml] ...`: run a pipeline stage, as dvc.yaml does;
the one entry of the stages (their modules have no command line of their own).

Reads: the params file (`--params`), which it validates once, before anything else, and hands to
the stage; then the stage reads and writes what its module says (fetch, preprocess, train,
evaluate, plot).

The stage's module is imported only after its arguments and params are checked: train and
evaluate import TensorFlow (about 6 s), plot and the MLflow client about 2 s, and a typo in
params.yaml or a missing option is reported in a fraction of a second, with nothing written.
`--help` (of the command or of a stage) imports nothing heavy either.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from alexnet8 import cli
from alexnet8.params import load_params
from alexnet8.tensorflow_startup import load_tensorflow

TENSORFLOW_STAGES = {"train", "evaluate"}  # loaded without its start-up noise (tensorflow_startup.py)


def command_parser() -> argparse.ArgumentParser:
    """`python -m alexnet8`'s parser: one sub-command per stage, with the stage's own options."""
    argument_parser = argparse.ArgumentParser(
        prog="python -m alexnet8", description="Run a stage of the pipeline (dvc.yaml gives the arguments)."
    )
    stages = argument_parser.add_subparsers(dest="stage", required=True, metavar="{" + ",".join(cli.STAGES) + "}")
    for name, stage in cli.STAGES.items():
        cli.stage_parser(name, stages.add_parser(name, help=stage.description, description=stage.description))
    return argument_parser


def run_stage(argv: Sequence[str]) -> None:
    """Run the stage `argv` names, in this process: its params loaded and validated once
    (ParamsError naming the file and the key), then handed with its options to the stage's
    `main(arguments, params)`. Errors are raised (main turns them into exit codes)."""
    arguments = command_parser().parse_args(argv)  # exits 2 with the usage on a wrong command line
    params = load_params(arguments.params) if cli.STAGES[arguments.stage].reads_params else None
    if arguments.stage in TENSORFLOW_STAGES:
        load_tensorflow()
    importlib.import_module(f"alexnet8.{arguments.stage}").main(arguments, params)


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m alexnet8 <stage> ...`, or the same in-process: `main(["train", "--data", ...])`.
    A PipelineError exits 1 with its message, an interrupt 130 (cli.run)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    stage = cli.STAGES[command_parser().parse_args(argv).stage]
    cli.run(run_stage, argv, interrupted=stage.interrupted)


if __name__ == "__main__":
    main()
