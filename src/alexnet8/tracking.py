"""MLflow plumbing shared by the train, evaluate and plot stages: one pipeline run is one MLflow run.

Reads and writes the run file (`--run-file` in dvc.yaml, JSON: run id, experiment id, tracking
URI): train starts the run and writes it; evaluate and plot read it to log into the same run.

Where runs go is MLflow's own choice: `MLFLOW_TRACKING_URI` when set (a tracking server, a
database), otherwise MLflow's default store in the working folder (`mlflow.db`), which a plain
`mlflow ui` started in the project root shows. Under `mlflow run` the launcher's run
(`MLFLOW_RUN_ID`) is used, so the project run and the pipeline run are the same.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException

from alexnet8.errors import PipelineError
from alexnet8.files import write_json

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def start_pipeline_run(experiment_name: str, run_name: str, run_file: str | Path) -> Iterator[mlflow.ActiveRun]:
    """Start (or, under `mlflow run`, continue) the pipeline's run and record it in `run_file`.

    An exception inside the block ends the run as FAILED; the run file is written only on success,
    so later stages never log into a failed run.
    """
    if os.environ.get("MLFLOW_RUN_ID"):
        # `mlflow run` made the run in its own experiment; setting ours would conflict with it.
        run = mlflow.start_run()
    else:
        mlflow.set_experiment(experiment_name)
        run = mlflow.start_run(run_name=run_name)
    with run:
        logger.info("MLflow run %s in experiment %s at %s", run.info.run_id, run.info.experiment_id, mlflow.get_tracking_uri())
        yield run
        write_json(
            run_file,
            {
                "run_id": run.info.run_id,
                "experiment_id": run.info.experiment_id,
                "tracking_uri": mlflow.get_tracking_uri(),
            },
        )


@contextlib.contextmanager
def resume_pipeline_run(run_file: str | Path) -> Iterator[mlflow.ActiveRun]:
    """Reopen the run that the train stage recorded in `run_file`; it ends FINISHED, or FAILED on error."""
    run_file = Path(run_file)
    try:
        recorded = json.loads(run_file.read_text(encoding="utf-8"))
        run_id = recorded["run_id"]
    except FileNotFoundError:
        raise PipelineError(f"{run_file} not found: run the train stage first") from None
    except (ValueError, KeyError) as error:
        raise PipelineError(f"{run_file}: not a run file written by the train stage ({error})") from None
    try:
        run = mlflow.start_run(run_id=run_id)
    except MlflowException as error:
        raise PipelineError(
            f"MLflow run {run_id} (from {run_file}, logged to {recorded.get('tracking_uri')}) cannot be "
            f"reopened at {mlflow.get_tracking_uri()}: {error.message}"
        ) from None
    with run:
        yield run
