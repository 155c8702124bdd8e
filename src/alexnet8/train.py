"""Stage `train`: train AlexNet8 on the training split, validating after every epoch, tracked in MLflow.

Reads: the prepared folder `--data` (train and validation splits, dataset.json); params `seed`,
`train.*`, `mlflow.*`.
Writes: the model `--model` (`.keras`), the per-epoch history `--history` (CSV, for `dvc plots`),
the last epoch's metrics `--metrics` (JSON, for `dvc metrics`), and the run file `--run-file`
naming the MLflow run. MLflow gets every param, per-epoch loss and accuracy (training and
validation, step = epoch), the model with a signature and an input example, and provenance
(git commit, data md5s, params.yaml, dvc.lock, package versions).
While training runs, `--checkpoints/<key>/` holds the state to resume from after an
interruption (see checkpoints.py); it is deleted once the model is saved and logged.
"""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import keras
import numpy as np
from mlflow.exceptions import MlflowException

from alexnet8 import cli
from alexnet8.checkpoints import (
    HISTORY_FILE,
    RUN_RECORD_FILE,
    DropoutStateBackup,
    checkpoint_dir_for,
    completed_epochs,
    training_key,
)
from alexnet8.dataset import DATASET_FILE, Split, dataset_digest, load_description, load_split
from alexnet8.epoch_progress import EpochProgress
from alexnet8.errors import PipelineError
from alexnet8.files import atomic_path, write_json
from alexnet8.input_pipeline import make_dataset, one_hot_length, training_dataset
from alexnet8.model import with_keras_batch_norm
from alexnet8.model_tracking import EpochMetricsToMlflow, log_classifier, log_missing_epochs
from alexnet8.optimization import build_compiled_model
from alexnet8.params import TrainParams, load_params
from alexnet8.reports import history_columns, truncate_history
from alexnet8.runtime import configure_runtime, distribution_strategy
from alexnet8.tracking import (
    check_tracking_server,
    default_run_name,
    failure_reason,
    log_run_inputs,
    start_pipeline_run,
)

logger = logging.getLogger(__name__)


class TrainingDiverged(PipelineError):
    """The loss became NaN or infinite."""


def train_model(
    params: TrainParams,
    seed: int,
    train_split: Split,
    validation_split: Split,
    num_classes: int,
    checkpoint_dir: str | Path,
    log_to_mlflow: bool = False,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    normalization: Mapping | None = None,
) -> tuple[keras.Model, dict[str, list[float]]]:
    """Build, compile and fit AlexNet8 on the splits' raw pixels, normalized inside the model as
    `normalization` (dataset.json's) says, resuming from `checkpoint_dir` if an earlier run was
    interrupted.

    The caller deletes `checkpoint_dir` once the model is safe. Returns the model and the
    per-epoch history of all epochs, including those of the interrupted run.
    """
    keras.utils.set_random_seed(seed)
    checkpoint_dir = Path(checkpoint_dir)
    first_epoch = completed_epochs(checkpoint_dir)
    if first_epoch:
        logger.info("resuming from %s after epoch %d of %d", checkpoint_dir, first_epoch, params.epochs)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    history_path = checkpoint_dir / HISTORY_FILE
    truncate_history(history_path, first_epoch)

    steps_per_epoch = math.ceil(len(train_split.labels) / params.batch_size)
    with distribution_strategy().scope():
        model = build_compiled_model(params, num_classes, steps_per_epoch, normalization)
    # BackupAndRestore needs a built optimizer to restore its state into.
    model.optimizer.build(model.trainable_variables)
    model.fit(
        training_dataset(params, train_split, seed, num_classes, first_epoch=first_epoch),
        validation_data=make_dataset(
            validation_split, params.batch_size, one_hot_classes=one_hot_length(params, num_classes)
        ),
        epochs=params.epochs,
        steps_per_epoch=steps_per_epoch,
        shuffle=False,  # the dataset shuffles itself, per epoch
        callbacks=[
            # Progress within each epoch (a bar on a terminal, a log line every ~10% otherwise), then its metrics.
            EpochProgress(steps_per_epoch, params.batch_size),
            keras.callbacks.TerminateOnNaN(),
            # Everything an epoch leaves is written before BackupAndRestore's checkpoint, which
            # marks the epoch done; MLflow is told after it (see EpochMetricsToMlflow).
            keras.callbacks.CSVLogger(str(history_path), append=True),
            DropoutStateBackup(checkpoint_dir),
            keras.callbacks.BackupAndRestore(str(checkpoint_dir), delete_checkpoint=False),
            *([EpochMetricsToMlflow(history_path)] if log_to_mlflow else []),
            *callbacks,
        ],
        verbose=0,  # EpochProgress reports instead
    )
    history = history_columns(history_path)
    losses = history.get("loss", [])
    if len(losses) < params.epochs or not np.all(np.isfinite(losses)):
        shutil.rmtree(checkpoint_dir, ignore_errors=True)  # a diverged state is nothing to resume from
        raise TrainingDiverged(
            f"training stopped at epoch {len(losses)} of {params.epochs}: the loss became "
            f"{losses[-1] if losses else 'NaN'}; try a smaller train.learning_rate. No model was saved."
        )
    return model, history


def main(argv: Sequence[str] | None = None) -> None:
    arguments = cli.stage_parser("train").parse_args(argv)
    params = load_params(arguments.params)
    check_tracking_server()

    description = load_description(arguments.data)
    train_split = load_split(arguments.data, "train")
    validation_split = load_split(arguments.data, "validation")
    this_checkpoint = checkpoint_dir_for(arguments.checkpoints, training_key(params, description))
    train_params = configure_runtime(params.train)  # `jit_compile: auto` resolved for this machine

    run_name = default_run_name(params)
    with start_pipeline_run(
        params.mlflow.experiment_name,
        run_name,
        arguments.run_file,
        interrupted_run_file=this_checkpoint / RUN_RECORD_FILE,
    ) as record:
        log_run_inputs(
            params,
            arguments.params,
            description,
            dataset_digest(arguments.data),
            derived={"jit_compile": train_params.jit_compile},
        )
        model, history = train_model(
            train_params,
            params.seed,
            train_split,
            validation_split,
            num_classes=len(description["class_names"]),
            checkpoint_dir=this_checkpoint,
            log_to_mlflow=True,
            normalization=description["normalization"],
        )
        with atomic_path(arguments.model, suffix=".keras") as temporary:
            with_keras_batch_norm(model).save(temporary)  # a file any Keras loads
        logger.info("saved %s", arguments.model)
        with atomic_path(arguments.history) as temporary:
            shutil.copyfile(this_checkpoint / HISTORY_FILE, temporary)
        write_json(arguments.metrics, {name: values[-1] for name, values in history.items()})
        try:
            log_missing_epochs(this_checkpoint / HISTORY_FILE)  # those the server missed while it was away
            logged = log_classifier(
                arguments.model,
                Path(arguments.data) / DATASET_FILE,
                description["class_names"],
                example_images=train_split.images[:2],
                name=run_name,
                step=params.train.epochs - 1,  # links the model to the last epoch's metrics
                registered_model_name=params.mlflow.registered_model_name or None,
            )
        except MlflowException as error:  # the server, or its artifact store, is down
            raise PipelineError(
                f"the model is trained and saved in {arguments.model}, but MLflow at {record['tracking_uri']} "
                f"does not take it ({failure_reason(error)}): rerun to log it. Once the server and its artifact "
                f"store answer again, `dvc repro` resumes after the last epoch (from {this_checkpoint}) and logs "
                "the model, and any epoch's metrics the server missed, into the same run."
            ) from None
        record["model_id"] = logged.model_id
        if logged.registered_model_version is not None:
            record |= {
                "registered_model": params.mlflow.registered_model_name,
                "model_version": str(logged.registered_model_version),
            }
    shutil.rmtree(this_checkpoint, ignore_errors=True)


if __name__ == "__main__":
    cli.run(main, interrupted=cli.STAGES["train"].interrupted)
