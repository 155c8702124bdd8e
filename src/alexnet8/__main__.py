"""`python -m alexnet8 <stage> [--params params.yaml] ...`: run a pipeline stage, as dvc.yaml does.

Reads: the params file (`--params`), which it validates before anything else; then the stage
reads and writes what its module says (fetch, preprocess, train, evaluate, plot).

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


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    arguments = command_parser().parse_args(argv)  # exits 2 with the usage on a wrong command line
    stage = cli.STAGES[arguments.stage]

    def run(stage_argv: Sequence[str]) -> None:
        if stage.reads_params:
            load_params(arguments.params)  # ParamsError: exit 1, naming the file and the key
        if arguments.stage in TENSORFLOW_STAGES:
            load_tensorflow()
        importlib.import_module(f"alexnet8.{arguments.stage}").main(stage_argv)

    cli.run(run, argv[1:], interrupted=stage.interrupted)


if __name__ == "__main__":
    main()
