"""Stage `train`: train AlexNet8 on the training split, validating after every epoch, tracked in MLflow.

Reads: the prepared folder `--data` (train and validation splits, dataset.json); params `seed`,
`train.*`, `mlflow.*`.
Writes: the model `--model` (`.keras`), the per-epoch history `--history` (CSV, for `dvc plots`),
the last epoch's metrics `--metrics` (JSON, for `dvc metrics`), and the run file `--run-file`
naming the MLflow run. MLflow gets every param but `evaluate.*`, per-epoch loss and accuracy
(training and validation, step = epoch) and provenance (git commit, data md5s, params.yaml,
dvc.lock, package versions); the evaluate stage logs and registers the model it scores.
While training runs, `--checkpoints/<key>/` holds the state to resume from after an
interruption (see checkpoints.py); it is deleted once the model is saved and every epoch logged.
With `TF_CONFIG` set, this is one worker of a multi-worker training (multi_worker.py): the
chief does all of the above; the other workers train their share of each batch and write nothing.
"""

from __future__ import annotations

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

from alexnet8 import cli
from alexnet8.checkpoints import (
    HISTORY_FILE,
    RUN_RECORD_FILE,
    DropoutStateBackup,
    checkpoint_dir_for,
    completed_epochs,
    training_key,
)
from alexnet8.dataset import Split, dataset_digest, load_description, load_split
from alexnet8.epoch_progress import EpochProgress
from alexnet8.errors import PipelineError
from alexnet8.files import atomic_path, write_json
from alexnet8.input_pipeline import make_dataset, one_hot_length, training_dataset
from alexnet8.model import initialize_conv1_whitening, portable_model, saved_weights_digest
from alexnet8.model_tracking import EpochMetricsToMlflow, log_missing_epochs
from alexnet8.multi_worker import (
    WORKERS_TAG,
    RestoreOnly,
    Worker,
    WorkerDropoutState,
    check_last_batch,
    join_cluster,
    peer_failures_explained,
    prepare_for_fit,
)
from alexnet8.optimization import build_compiled_model
from alexnet8.params import TrainParams, load_params
from alexnet8.reports import history_columns, truncate_history
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
    worker: Worker | None = None,
) -> tuple[keras.Model, dict[str, list[float]]]:
    """Build, compile and fit AlexNet8 on the splits' raw pixels, normalized inside the model as
    `normalization` (dataset.json's) says, resuming from `checkpoint_dir` if an earlier run was
    interrupted.

    The caller deletes `checkpoint_dir` once the model is safe. Returns the model and the
    per-epoch history of all epochs, including those of the interrupted run. With `worker`, this
    is one worker of a multi-worker training: a worker other than the chief reads the chief's
    `checkpoint_dir` to resume from and writes nothing there.
    """
    checkpoint_dir = Path(checkpoint_dir)
    with _history_file(checkpoint_dir, worker) as history_path:
        keras.utils.set_random_seed(seed)
        first_epoch = completed_epochs(checkpoint_dir)
        if first_epoch:
            logger.info("resuming from %s after epoch %d of %d", checkpoint_dir, first_epoch, params.epochs)
        truncate_history(history_path, first_epoch)

        steps_per_epoch = math.ceil(len(train_split.labels) / params.batch_size)
        strategy = worker.strategy if worker else distribution_strategy()
        with strategy.scope():
            model = build_compiled_model(params, num_classes, steps_per_epoch, normalization)
            if params.whitening_images:
                initialize_conv1_whitening(model, train_split.images[: params.whitening_images])
            # BackupAndRestore needs a built optimizer to restore its state into.
            model.optimizer.build(model.trainable_variables)
        one_hot = one_hot_length(params, num_classes)
        train_data = training_dataset(params, train_split, seed, num_classes, first_epoch=first_epoch)
        validation_data = make_dataset(validation_split, params.batch_size, one_hot_classes=one_hot)
        backup = keras.callbacks.BackupAndRestore(str(checkpoint_dir), delete_checkpoint=False)
        dropout_state = DropoutStateBackup(checkpoint_dir)
        if worker:
            workers, rank = worker.cluster.workers, worker.cluster.rank
            worker.agree_on_epoch(first_epoch, params.epochs)
            prepare_for_fit(model, strategy, train_data.element_spec)
            train_data = worker.distribute(
                lambda: training_dataset(params, train_split, seed, num_classes, first_epoch, workers, rank)
            )
            validation_data = worker.distribute(
                lambda: make_dataset(
                    validation_split, params.batch_size, one_hot_classes=one_hot, workers=workers, rank=rank
                )
            )
            dropout_state = WorkerDropoutState(checkpoint_dir, rank)
            if not worker.is_chief:
                backup = RestoreOnly(str(checkpoint_dir), delete_checkpoint=False)
        # A dead or unreachable peer fails this worker with a message saying how to resume.
        with peer_failures_explained(checkpoint_dir) if worker else contextlib.nullcontext():
            model.fit(
                train_data,
                validation_data=validation_data,
                epochs=params.epochs,
                steps_per_epoch=steps_per_epoch,
                shuffle=False,  # the dataset shuffles itself, per epoch
                callbacks=[
                    # Progress within each epoch (a bar on a terminal, a log line every ~10%
                    # otherwise), then its metrics.
                    EpochProgress(steps_per_epoch, params.batch_size),
                    keras.callbacks.TerminateOnNaN(),
                    # Everything an epoch leaves is written before BackupAndRestore's checkpoint, which
                    # marks the epoch done; MLflow is told after it (see EpochMetricsToMlflow).
                    keras.callbacks.CSVLogger(str(history_path), append=True),
                    dropout_state,
                    backup,
                    *([EpochMetricsToMlflow(history_path)] if log_to_mlflow else []),
                    *callbacks,
                ],
                verbose=0,  # EpochProgress reports instead
            )
        history = history_columns(history_path)
        losses = history.get("loss", [])
        if len(losses) < params.epochs or not np.all(np.isfinite(losses)):
            if worker is None or worker.is_chief:
                shutil.rmtree(checkpoint_dir, ignore_errors=True)  # a diverged state is nothing to resume from
            raise TrainingDiverged(
                f"training stopped at epoch {len(losses)} of {params.epochs}: the loss became "
                f"{losses[-1] if losses else 'NaN'}; try a smaller train.learning_rate. No model was saved."
            )
        return model, history


@contextlib.contextmanager
def _history_file(checkpoint_dir: Path, worker: Worker | None) -> Iterator[Path]:
    """Where the per-epoch history goes: the checkpoint folder's, or for a worker other than the
    chief, a private copy of it (it resumes from the chief's and writes nothing there)."""
    if worker is None or worker.is_chief:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        yield checkpoint_dir / HISTORY_FILE
        return
    with tempfile.TemporaryDirectory(prefix="alexnet8-worker-") as private:
        history = Path(private) / HISTORY_FILE
        if (checkpoint_dir / HISTORY_FILE).exists():
            shutil.copyfile(checkpoint_dir / HISTORY_FILE, history)
        yield history


def main(argv: Sequence[str] | None = None) -> None:
    arguments = cli.stage_parser("train").parse_args(argv)
    params = load_params(arguments.params)
    # With TF_CONFIG: the multi-worker strategy, made before any other TensorFlow op.
    worker = join_cluster(params.train.batch_size)
    chief = worker is None or worker.is_chief
    if chief:
        check_tracking_server()

    description = load_description(arguments.data)
    train_split = load_split(arguments.data, "train")
    validation_split = load_split(arguments.data, "validation")
    if worker is not None:
        check_last_batch(len(train_split.labels), params.train.batch_size, worker.cluster.workers)
    train_params = configure_runtime(params.train)  # `jit_compile: auto` resolved for this machine
    if not chief:
        # Trains its share of each batch in step with the chief, which alone logs and writes.
        train_model(
            train_params,
            params.seed,
            train_split,
            validation_split,
            num_classes=len(description["class_names"]),
            checkpoint_dir=Path(arguments.checkpoints) / training_key(params, description),
            normalization=description["normalization"],
            worker=worker,
        )
        logger.info("%s done: the chief saves the model and logs the run", worker.cluster.task)
        return
    this_checkpoint = checkpoint_dir_for(arguments.checkpoints, training_key(params, description))

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
        mlflow.set_tag(WORKERS_TAG, str(worker.cluster.workers if worker else 1))
        mlflow.set_tags(machine_facts())  # what decides bit-identity elsewhere (reproduce.py)
        model, history = train_model(
            train_params,
            params.seed,
            train_split,
            validation_split,
            num_classes=len(description["class_names"]),
            checkpoint_dir=this_checkpoint,
            log_to_mlflow=True,
            normalization=description["normalization"],
            worker=worker,
        )
        with atomic_path(arguments.model, suffix=".keras") as temporary:
            portable_model(model).save(temporary)  # a file any Keras loads
        logger.info("saved %s", arguments.model)
        with atomic_path(arguments.history) as temporary:
            shutil.copyfile(this_checkpoint / HISTORY_FILE, temporary)
        write_json(arguments.metrics, {name: values[-1] for name, values in history.items()})
        try:
            log_missing_epochs(this_checkpoint / HISTORY_FILE)  # those the server missed while it was away
            mlflow.set_tag(WEIGHTS_DIGEST_TAG, saved_weights_digest(arguments.model))
        except MlflowException as error:  # the server is down
            raise PipelineError(
                f"the model is trained and saved in {arguments.model}, but MLflow at {record['tracking_uri']} "
                f"does not take its last epochs' metrics ({failure_reason(error)}): rerun once the server answers "
                f"again; `dvc repro` resumes after the last epoch (from {this_checkpoint}) and logs them into the "
                "same run."
            ) from None
    shutil.rmtree(this_checkpoint, ignore_errors=True)


if __name__ == "__main__":
    cli.run(main, interrupted=cli.STAGES["train"].interrupted)
