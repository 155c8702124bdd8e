"""Stage `train`: train AlexNet8 on the training split, validating after every epoch, tracked in MLflow.

Reads: the prepared folder `--data` (train and validation splits, dataset.json); params `seed`,
`train.*`, `mlflow.*`.
Writes: the model `--model` (`.keras`), the per-epoch history `--history` (CSV, for `dvc plots`),
the last epoch's training loss and validation accuracy `--metrics` (JSON, for `dvc metrics`),
and the run file `--run-file` naming the MLflow run. MLflow gets every param but `evaluate.*`,
per-epoch loss and accuracy (training and validation, step = epoch from 1), MLflow's system
metrics and provenance (git commit, data md5s, params.yaml, dvc.lock, package versions); the
evaluate stage logs and registers the model it scores.
While training runs, `--checkpoints/<key>/` holds each epoch's state, to resume from after an
interruption (see checkpoints.py); it is deleted once the model is saved and every epoch logged.
With `TF_CONFIG` set, this is one worker of a multi-worker training (multi_worker.py): the
chief does all of the above; the other workers train their share of each batch and write nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import keras
import mlflow
import numpy as np
from mlflow.exceptions import MlflowException

from alexnet8.checkpoints import (
    HISTORY_FILE,
    RUN_RECORD_FILE,
    EpochCheckpoint,
    EpochHistory,
    SavedEpoch,
    delete_other_checkpoint_dirs,
    disk_space_explained,
    latest_saved_epoch,
    recover_run_record,
    restore_state,
    training_key,
)
from alexnet8.dataset import DatasetDescription, Split, dataset_digest, load_description, load_split
from alexnet8.epoch_logging import EpochMetricsAndSummaryToMlflow, log_missing_epochs
from alexnet8.epoch_progress import EpochProgress
from alexnet8.errors import PipelineError
from alexnet8.files import atomic_path, disk_full, no_space_message, write_json, write_text
from alexnet8.input_pipeline import make_dataset, one_hot_length, training_dataset
from alexnet8.metric_names import TRAIN_HEADLINE, headline
from alexnet8.multi_worker import WORKERS_TAG, Worker, check_last_batch, join_cluster, offset_dropout_seeds
from alexnet8.network import (
    initialize_conv1_whitening,
    portable_model,
    refit_batch_norm_statistics,
    saved_weights_digest,
)
from alexnet8.optimization import build_compiled_model
from alexnet8.params import Params, TrainParams
from alexnet8.reports import history_columns
from alexnet8.run_record import RunRecord
from alexnet8.runtime import configure_runtime, distribution_strategy, machine_facts
from alexnet8.tracking import (
    WEIGHTS_DIGEST_TAG,
    check_tracking_server,
    default_run_name,
    failure_reason,
    log_run_inputs,
    start_pipeline_run,
)

logger = logging.getLogger(__name__)

MODEL_BYTES_ESTIMATE = 40_000_000  # a full-size AlexNet8 `.keras` file without optimizer state: 39 MB


class TrainingNotFinished(PipelineError):
    """Training stopped before its last epoch (TerminateOnNaN stops it at a NaN loss), or its loss
    became NaN or infinite."""


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
    worker: Worker | None = None,
) -> tuple[keras.Model, dict[str, list[float]]]:
    """Build, compile and fit AlexNet8 on the splits' raw pixels, normalized inside the model as
    `normalization` (dataset.json's) says, resuming from `checkpoint_dir` if an earlier run was
    interrupted.

    The caller deletes `checkpoint_dir` once the model is safe. Returns the model and the
    per-epoch history of all epochs, including those of the interrupted run. `worker` says where
    this process trains (multi_worker.Worker; by default alone): a worker other than the chief
    reads the chief's `checkpoint_dir` to resume from and writes nothing there.
    """
    checkpoint_dir = Path(checkpoint_dir)
    worker = worker or Worker(distribution_strategy())
    keras.utils.set_random_seed(seed)
    steps_per_epoch = math.ceil(len(train_split.labels) / params.batch_size)
    model, resumed = _built_model(
        params, train_split.images, num_classes, steps_per_epoch, normalization, checkpoint_dir, worker
    )
    first_epoch = resumed.epoch if resumed else 0
    with (
        disk_space_explained(checkpoint_dir),
        _history_file(checkpoint_dir, worker.is_chief, resumed) as history_path,
    ):
        train_data = training_dataset(params, train_split, seed, num_classes, first_epoch, worker.workers, worker.rank)
        validation_data = make_dataset(
            validation_split,
            params.batch_size,
            one_hot_classes=one_hot_length(params, num_classes),
            workers=worker.workers,
            rank=worker.rank,
        )
        worker.prepare_model(model, first_epoch, params.epochs, train_data.element_spec)
        with worker.failures_explained(checkpoint_dir):
            model.fit(
                worker.distribute(train_data),
                validation_data=worker.distribute(validation_data),
                epochs=params.epochs,
                initial_epoch=first_epoch,
                steps_per_epoch=steps_per_epoch,
                shuffle=False,  # the dataset shuffles itself, per epoch
                callbacks=_epoch_callbacks(params, steps_per_epoch, checkpoint_dir, history_path, worker, log_to_mlflow)
                + list(callbacks),
                verbose=0,  # EpochProgress reports instead
            )
        history = history_columns(history_path)
        _check_finished(history, params.epochs, checkpoint_dir, worker.is_chief)
        return model, history


def _built_model(
    params: TrainParams,
    train_images: np.ndarray,
    num_classes: int,
    steps_per_epoch: int,
    normalization: Mapping | None,
    checkpoint_dir: Path,
    worker: Worker,
) -> tuple[keras.Model, SavedEpoch | None]:
    """The compiled model, in the state of the last epoch saved in `checkpoint_dir` if any (and that epoch)."""
    with worker.strategy.scope():
        model = build_compiled_model(params, num_classes, steps_per_epoch, normalization)
        if params.whitening_images:
            initialize_conv1_whitening(model, train_images[: params.whitening_images])
        model.optimizer.build(model.trainable_variables)  # its variables exist, to restore into
        resumed = latest_saved_epoch(checkpoint_dir, model, writer=worker.is_chief)
        if resumed:
            logger.info("resuming from %s after epoch %d of %d", resumed.path, resumed.epoch, params.epochs)
            restore_state(model, resumed)
        offset_dropout_seeds(model, worker.rank)
    return model, resumed


def _epoch_callbacks(
    params: TrainParams,
    steps_per_epoch: int,
    checkpoint_dir: Path,
    history_path: Path,
    worker: Worker,
    log_to_mlflow: bool,
) -> list[keras.callbacks.Callback]:
    return [
        # Progress within each epoch (a bar on a terminal, a log line every ~10% otherwise), then its
        # metrics: the chief's; the other workers' would repeat its lines in a cluster's one log.
        *([EpochProgress(steps_per_epoch, params.batch_size)] if worker.is_chief else []),
        keras.callbacks.TerminateOnNaN(),
        # The epoch's history row is written before its checkpoint set, which holds it and marks
        # the epoch done (the chief's); MLflow is told after it (see EpochMetricsAndSummaryToMlflow).
        EpochHistory(history_path),
        *([EpochCheckpoint(checkpoint_dir, history_path)] if worker.is_chief else []),
        *([EpochMetricsAndSummaryToMlflow(history_path)] if log_to_mlflow else []),
    ]


def _check_finished(history: dict[str, list[float]], epochs: int, checkpoint_dir: Path, chief: bool) -> None:
    """TrainingNotFinished unless every epoch ran with a finite loss; the chief then deletes the
    checkpoint folder: a diverged state is nothing to resume from."""
    losses = history.get("train/loss", [])
    if len(losses) < epochs or not np.all(np.isfinite(losses)):
        if chief:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
        raise TrainingNotFinished(
            f"training stopped at epoch {len(losses)} of {epochs}: the loss became "
            f"{losses[-1] if losses else 'NaN'}; try a smaller train.learning_rate. No model was saved."
        )


@contextlib.contextmanager
def _history_file(checkpoint_dir: Path, chief: bool, resumed: SavedEpoch | None) -> Iterator[Path]:
    """Where the per-epoch history goes, holding the resumed set's epochs: the checkpoint folder's,
    or for a worker other than the chief, a private file (it writes nothing in that folder)."""
    with contextlib.ExitStack() as stack:
        private = None if chief else stack.enter_context(tempfile.TemporaryDirectory(prefix="alexnet8-worker-"))
        folder = Path(private) if private else checkpoint_dir
        folder.mkdir(parents=True, exist_ok=True)
        history = folder / HISTORY_FILE
        if resumed:
            write_text(history, resumed.history)
        else:
            history.unlink(missing_ok=True)  # rows of an epoch whose set was never complete
        yield history


def save_model(model: keras.Model, path: Path, refit_images: np.ndarray | None = None) -> None:
    """Save the trained model as a file any Keras loads, its batch-norm statistics refit on
    `refit_images` if given (model.refit_batch_norm_statistics); a full disk is a PipelineError
    naming the folder (the checkpoint of the last epoch stays, so the rerun saves without retraining)."""
    model = portable_model(model)
    if refit_images is not None and len(refit_images):
        refit_batch_norm_statistics(model, refit_images)
    try:
        with atomic_path(path, suffix=".keras") as temporary:
            model.save(temporary)
    except OSError as error:
        if not disk_full(error, path.parent, MODEL_BYTES_ESTIMATE):
            raise
        raise PipelineError(
            no_space_message(path.parent, "the trained model", MODEL_BYTES_ESTIMATE, exact=False)
            + ": it resumes after the last epoch and saves the model"
        ) from None
    logger.info("saved %s", path)


def main(arguments: argparse.Namespace, params: Params) -> None:
    """The stage, as `python -m alexnet8 train` runs it: `arguments` are its options, `params` validated."""
    # With TF_CONFIG: the multi-worker strategy, made before any other TensorFlow op.
    worker = join_cluster(params.train.batch_size)
    if worker.is_chief:
        check_tracking_server()
    description = load_description(arguments.data)
    train_split = load_split(arguments.data, "train")
    validation_split = load_split(arguments.data, "validation")
    check_last_batch(len(train_split.labels), params.train.batch_size, worker.workers)
    # `jit_compile: auto` resolved for this machine
    train_params = configure_runtime(params.train, multi_worker=worker.cluster is not None)
    checkpoint = Path(arguments.checkpoints) / training_key(params, description)
    if worker.is_chief:  # which keeps this training's checkpoint folder alone; the other workers only read it
        delete_other_checkpoint_dirs(arguments.checkpoints, checkpoint.name)
    with _chief_run(arguments, params, train_params, description, checkpoint, worker) as record:
        model, history = train_model(
            train_params,
            params.seed,
            train_split,
            validation_split,
            num_classes=len(description.class_names),
            checkpoint_dir=checkpoint,
            log_to_mlflow=worker.is_chief,
            normalization=description.normalization.model_dump(exclude_none=True),
            worker=worker,
        )
        if record is None:  # a worker other than the chief trained its share of each batch
            logger.info("%s done: the chief saves the model and logs the run", worker.cluster.task)
            return
        refit_images = train_split.images[: train_params.batch_norm_refit_images]
        _write_outputs(arguments, model, history, checkpoint, record, refit_images)
    shutil.rmtree(checkpoint, ignore_errors=True)


@contextlib.contextmanager
def _chief_run(
    arguments: argparse.Namespace,
    params: Params,
    train_params: TrainParams,
    description: DatasetDescription,
    checkpoint: Path,
    worker: Worker,
) -> Iterator[RunRecord | None]:
    """For the chief, the pipeline's MLflow run (continuing the interrupted one), its inputs logged;
    None for the other workers, which log nothing."""
    if not worker.is_chief:
        yield None
        return
    recover_run_record(checkpoint)
    with start_pipeline_run(
        params.mlflow.experiment_name,
        default_run_name(params),
        arguments.run_file,
        interrupted_run_file=checkpoint / RUN_RECORD_FILE,
    ) as record:
        log_run_inputs(
            params,
            arguments.params,
            description,
            dataset_digest(arguments.data),
            derived={"jit_compile": train_params.jit_compile},
        )
        mlflow.set_tag(WORKERS_TAG, str(worker.workers))
        mlflow.set_tags(machine_facts())  # what decides bit-identity elsewhere (reproduce.py)
        yield record


def _write_outputs(
    arguments: argparse.Namespace,
    model: keras.Model,
    history: dict[str, list[float]],
    checkpoint: Path,
    record: RunRecord,
    refit_images: np.ndarray,
) -> None:
    """The model (its batch-norm statistics refit on `refit_images`, if any), history and metrics
    files; then the epochs MLflow missed and the weights' digest."""
    save_model(model, Path(arguments.model), refit_images)
    with atomic_path(arguments.history) as temporary:
        shutil.copyfile(checkpoint / HISTORY_FILE, temporary)
    write_json(arguments.metrics, headline({name: values[-1] for name, values in history.items()}, TRAIN_HEADLINE))
    try:
        log_missing_epochs(checkpoint / HISTORY_FILE)  # those the server missed while it was away
        mlflow.set_tag(WEIGHTS_DIGEST_TAG, saved_weights_digest(arguments.model))
    except MlflowException as error:  # the server is down
        raise PipelineError(
            f"the model is trained and saved in {arguments.model}, but MLflow at {record.tracking_uri} "
            f"does not take its last epochs' metrics ({failure_reason(error)}): rerun once the server answers "
            f"again; `dvc repro` resumes after the last epoch (from {checkpoint}) and logs them into the "
            "same run."
        ) from None
