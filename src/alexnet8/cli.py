"""What every command shares: the stages' command lines, logging set-up, and turning known
errors into exit codes.

The stages' command lines are declared here, in a module that imports nothing heavy, so that
`python -m alexnet8 <stage>` (__main__.py) can answer `--help` and check params.yaml before the
stage's module imports TensorFlow or MLflow. Reads and writes nothing itself.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from alexnet8.errors import PipelineError

logger = logging.getLogger("alexnet8")


def parser(description: str | None, reads_params: bool = True) -> argparse.ArgumentParser:
    """An argument parser, with the `--params` option for the stages that read params."""
    argument_parser = argparse.ArgumentParser(description=description)
    if reads_params:
        argument_parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    return argument_parser


INTERRUPTED = "interrupted; nothing half-written was left: run the stage again (`dvc repro`)"


@dataclass(frozen=True)
class Stage:
    """A pipeline stage's command line: `python -m alexnet8 <stage> [--params FILE] --option VALUE ...`."""

    description: str
    options: Mapping[str, str]  # each required option, and its help
    reads_params: bool = True
    interrupted: str = field(default=INTERRUPTED)  # the message after Ctrl-C or SIGTERM


# In pipeline order; dvc.yaml gives each option's path.
STAGES = {
    "fetch": Stage(
        "Stage `fetch`: download the CIFAR-10 binary archive and verify its md5.",
        {"--out": "where to write the archive"},
    ),
    "preprocess": Stage(
        "Stage `preprocess`: CIFAR-10 binary archive -> image and label arrays, split for validation.",
        {"--archive": "the CIFAR-10 binary tar.gz", "--out": "folder for the prepared arrays"},
    ),
    "train": Stage(
        "Stage `train`: train AlexNet8 on the training split, validating after every epoch, tracked in MLflow.",
        {
            "--data": "prepared dataset folder",
            "--model": "where to save the model (.keras)",
            "--history": "per-epoch history CSV",
            "--metrics": "final training metrics JSON",
            "--run-file": "JSON naming the MLflow run",
            "--checkpoints": "folder for the state of an interrupted training (not a DVC output)",
        },
        interrupted="interrupted; run the stage again (`dvc repro`) to resume training after the last completed epoch",
    ),
    "evaluate": Stage(
        "Stage `evaluate`: assemble the served model, score it, log and register it.",
        {
            "--model": "trained model (.keras)",
            "--data": "prepared dataset folder",
            "--run-file": "JSON naming the training's MLflow run",
            "--metrics": "test metrics JSON to write",
            "--predictions": "per-image predictions CSV to write",
            "--served-model": "JSON naming the logged and registered model to write",
        },
    ),
    "plot": Stage(
        "Stage `plot`: the original script's accuracy/loss figure, and the test confusion matrix, as PNGs.",
        {
            "--history": "per-epoch history CSV",
            "--predictions": "test predictions CSV",
            "--data": "prepared dataset folder (for class names)",
            "--run-file": "JSON naming the MLflow run",
            "--curves": "accuracy/loss figure to write (PNG)",
            "--confusion": "confusion matrix figure to write (PNG)",
        },
        reads_params=False,
    ),
}


def stage_parser(name: str, argument_parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`argument_parser` given the arguments of stage `name` (STAGES)."""
    stage = STAGES[name]
    if stage.reads_params:
        argument_parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    for option, help_text in stage.options.items():
        argument_parser.add_argument(option, required=True, help=help_text)
    return argument_parser


def run(
    stage: Callable[[Sequence[str] | None], None], argv: Sequence[str] | None = None, interrupted: str = INTERRUPTED
) -> None:
    """Run a stage's main with logging; a PipelineError exits 1 with its message and no traceback,
    an interrupt exits 130 with the message `interrupted`."""
    logging.basicConfig(
        level=os.environ.get("ALEXNET8_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # urllib3 logs each retry of an MLflow request, with its whole URL; when the tracking server
    # is away, the stages' own warnings say so once, and what happens next (tracking.py).
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
    # SIGTERM (what `kill` and most schedulers send) unwinds like Ctrl-C, so MLflow runs are
    # ended as KILLED and temporary files removed; SIGKILL can not be caught. Only the main
    # thread can take signals: a stage run in another (a Ray Train worker's) is stopped by Ray.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        stage(argv)
    except PipelineError as error:
        logger.error("%s", error)
        sys.exit(1)
    except KeyboardInterrupt:
        logger.error("%s", interrupted)
        # Everything was cleaned up while unwinding (MLflow run ended as KILLED, temporary files
        # removed). Skip interpreter shutdown: it can block for minutes joining tf.data worker
        # threads that were stopped mid-batch (seen after a SIGTERM in the middle of an epoch).
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")
