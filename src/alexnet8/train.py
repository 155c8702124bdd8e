"""Stage `train`: train AlexNet8 on the training split, validating after every epoch, tracked in MLflow.

Reads: the prepared folder `--data` (train and validation splits, dataset.json); params `seed`,
`train.*`, `mlflow.experiment_name`.
Writes: the model `--model` (`.keras`), the per-epoch history `--history` (CSV, for `dvc plots`),
the last epoch's metrics `--metrics` (JSON, for `dvc metrics`), and the run file `--run-file`
naming the MLflow run. MLflow gets every param, per-epoch loss and accuracy (training and
validation, step = epoch), the model with a signature and an input example, and the data's md5.
"""

from __future__ import annotations

import logging
import os
import types
from collections.abc import Sequence
from pathlib import Path

import keras
import mlflow
import numpy as np
import tensorflow as tf
from mlflow.models import infer_signature

from alexnet8 import cli
from alexnet8.dataset import Split, load_description, load_split
from alexnet8.errors import PipelineError
from alexnet8.files import atomic_path, write_json
from alexnet8.model import build_alexnet8
from alexnet8.params import Params, TrainParams, load_params
from alexnet8.tracking import start_pipeline_run

logger = logging.getLogger(__name__)


class TrainingDiverged(PipelineError):
    """The loss became NaN or infinite."""


class EpochMetricsToMlflow(mlflow.keras.MlflowCallback):
    """MLflow's Keras callback, logging once per epoch only.

    During `fit`, Keras also calls `on_test_end` after each validation pass; MLflow's callback
    logs those as `validation_*` at step 0 every epoch, duplicating the `val_*` metrics that
    `on_epoch_end` already logs with step = epoch.
    """

    def on_test_end(self, logs=None):
        pass


def make_dataset(split: Split, batch_size: int, shuffle: bool, seed: int) -> tf.data.Dataset:
    """Batches of (images, labels); with `shuffle`, a fresh seeded order every epoch, as `model.fit(shuffle=True)`."""
    # One in-memory float32 copy; batches are gathered by index, so shuffling never copies images.
    images = tf.constant(np.asarray(split.images))
    labels = tf.constant(np.asarray(split.labels))
    indices = tf.data.Dataset.range(len(split.labels))
    if shuffle:
        indices = indices.shuffle(len(split.labels), seed=seed, reshuffle_each_iteration=True)
    return (
        indices.batch(batch_size)
        .map(lambda index: (tf.gather(images, index), tf.gather(labels, index)), num_parallel_calls=tf.data.AUTOTUNE)
        .prefetch(tf.data.AUTOTUNE)
    )


def make_optimizer(params: TrainParams) -> keras.optimizers.Optimizer:
    if params.optimizer == "adam":
        return keras.optimizers.Adam(learning_rate=params.learning_rate)
    return keras.optimizers.SGD(learning_rate=params.learning_rate, momentum=params.momentum, nesterov=params.momentum > 0)


def build_compiled_model(params: TrainParams, num_classes: int) -> keras.Model:
    model = build_alexnet8(num_classes=num_classes, dense_units=params.dense_units, dropout=params.dropout)
    model.compile(
        optimizer=make_optimizer(params),
        loss=keras.losses.SparseCategoricalCrossentropy(),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
    )
    return model


def train_model(
    params: TrainParams,
    seed: int,
    train_split: Split,
    validation_split: Split,
    num_classes: int,
    history_path: str | Path,
    callbacks: Sequence[keras.callbacks.Callback] = (),
) -> tuple[keras.Model, dict[str, list[float]]]:
    """Build, compile and fit AlexNet8; the history CSV is written epoch by epoch. Returns model and history."""
    keras.utils.set_random_seed(seed)
    model = build_compiled_model(params, num_classes)
    train_data = make_dataset(train_split, params.batch_size, shuffle=True, seed=seed)
    validation_data = make_dataset(validation_split, params.batch_size, shuffle=False, seed=seed)
    Path(history_path).parent.mkdir(parents=True, exist_ok=True)
    history = model.fit(
        train_data,
        validation_data=validation_data,
        epochs=params.epochs,
        shuffle=False,  # the dataset reshuffles itself every epoch
        callbacks=[keras.callbacks.TerminateOnNaN(), keras.callbacks.CSVLogger(str(history_path)), *callbacks],
        verbose=2,
    )
    losses = history.history.get("loss", [])
    if len(losses) < params.epochs or not np.all(np.isfinite(losses)):
        raise TrainingDiverged(
            f"training stopped at epoch {len(losses)} of {params.epochs}: the loss became {losses[-1] if losses else 'NaN'}; "
            "try a smaller train.learning_rate. No model was saved."
        )
    return model, {name: [float(value) for value in values] for name, values in history.history.items()}


def run_name(params: Params) -> str:
    """A run name that says what differs between runs; under `dvc exp run`, the experiment's name."""
    experiment = os.environ.get("DVC_EXP_NAME")
    if experiment:
        return experiment
    train = params.train
    return f"{train.optimizer}-lr{train.learning_rate:g}-b{train.batch_size}-e{train.epochs}-{params.preprocess.normalization}"


def _save_keras_model(path: str, **kwargs) -> None:
    # MLflow 3.17's mlflow.keras.save_model writes input_example.json before it creates the model
    # folder, so log_model(..., input_example=...) fails with FileNotFoundError. Creating the
    # folder first is all it lacks; the flavor itself is MLflow's.
    os.makedirs(path, exist_ok=True)
    mlflow.keras.save_model(path=path, **kwargs)


_KERAS_FLAVOR = types.SimpleNamespace(__name__=mlflow.keras.__name__, save_model=_save_keras_model)


def log_model(model: keras.Model, example_images: np.ndarray) -> None:
    """Log the model as an MLflow Keras model (a LoggedModel) with its signature and an input example."""
    example_images = np.asarray(example_images[:2])
    signature = infer_signature(example_images, model.predict(example_images, verbose=0))
    mlflow.models.Model.log(
        artifact_path=None,
        name="model",
        flavor=_KERAS_FLAVOR,
        model=model,
        signature=signature,
        input_example=example_images,
        # Stating the requirements skips MLflow's inference, which reloads the model in a subprocess.
        pip_requirements=[f"keras=={keras.__version__}", f"tensorflow=={tf.__version__}"],
    )


def main(argv: Sequence[str] | None = None) -> None:
    argument_parser = cli.parser(__doc__.splitlines()[0])
    argument_parser.add_argument("--data", required=True, help="prepared dataset folder")
    argument_parser.add_argument("--model", required=True, help="where to save the model (.keras)")
    argument_parser.add_argument("--history", required=True, help="per-epoch history CSV")
    argument_parser.add_argument("--metrics", required=True, help="final training metrics JSON")
    argument_parser.add_argument("--run-file", required=True, help="JSON naming the MLflow run")
    arguments = argument_parser.parse_args(argv)
    params = load_params(arguments.params)

    description = load_description(arguments.data)
    train_split = load_split(arguments.data, "train")
    validation_split = load_split(arguments.data, "validation")

    with start_pipeline_run(params.mlflow.experiment_name, run_name(params), arguments.run_file):
        mlflow.log_params(params.flat())
        mlflow.set_tags(
            {
                "data.archive_md5": description["archive_md5"],
                "data.sizes": str(description["sizes"]),
                "dvc.experiment": os.environ.get("DVC_EXP_NAME", ""),
            }
        )
        mlflow.log_artifact(arguments.params)
        model, history = train_model(
            params.train,
            params.seed,
            train_split,
            validation_split,
            num_classes=len(description["class_names"]),
            history_path=arguments.history,
            callbacks=[EpochMetricsToMlflow()],
        )
        with atomic_path(arguments.model, suffix=".keras") as temporary:
            model.save(temporary)
        logger.info("saved %s", arguments.model)
        write_json(arguments.metrics, {name: values[-1] for name, values in history.items()})
        log_model(model, train_split.images)


if __name__ == "__main__":
    cli.run(main)
