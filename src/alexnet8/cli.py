"""What every stage's `main()` shares: logging set-up and turning known errors into exit codes.

Reads and writes nothing itself.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence

from alexnet8.errors import PipelineError

logger = logging.getLogger("alexnet8")


def parser(description: str | None, reads_params: bool = True) -> argparse.ArgumentParser:
    """An argument parser, with the `--params` option for the stages that read params."""
    argument_parser = argparse.ArgumentParser(description=description)
    if reads_params:
        argument_parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    return argument_parser


INTERRUPTED = "interrupted; nothing half-written was left: run the stage again (`dvc repro`)"


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
    # SIGTERM (what `kill` and most schedulers send) unwinds like Ctrl-C, so MLflow runs are
    # ended as KILLED and temporary files removed; SIGKILL can not be caught.
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
