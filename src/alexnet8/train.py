"""Stage `train`: train AlexNet8 on the training split, validating after every epoch, tracked in MLflow.

Reads: the prepared folder `--data` (train and validation splits, dataset.json); params `seed`,
`train.*`, `mlflow.*`.
Writes: the model `--model` (`.keras`), the per-epoch history `--history` (CSV, for `dvc plots`),
the last epoch's metrics `--metrics` (JSON, for `dvc metrics`), and the run file `--run-file`
naming the MLflow run. MLflow gets every param, per-epoch loss and accuracy (training and
validation, step = epoch), the model with a signature and an input example, and provenance
(git commit, data md5s, params.yaml, dvc.lock, package versions).
While training runs, `--checkpoints/<key>/` holds the state to resume from after an
interruption; it is deleted once the model is saved and logged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import types
from collections.abc import Sequence
from pathlib import Path

import keras
import mlflow
import numpy as np
import tensorflow as tf
from mlflow.models import infer_signature

from alexnet8 import cli
from alexnet8.dataset import ImageReader, Split, dataset_digest, load_description, load_split, read_history_rows
from alexnet8.errors import PipelineError
from alexnet8.files import atomic_path, write_json
from alexnet8.model import build_alexnet8
from alexnet8.params import Params, TrainParams, load_params
from alexnet8.tracking import check_tracking_server, installed_packages, provenance_tags, start_pipeline_run

logger = logging.getLogger(__name__)


class TrainingDiverged(PipelineError):
    """The loss became NaN or infinite."""


class EpochMetricsToMlflow(mlflow.keras.MlflowCallback):
    """MLflow's Keras callback, made exact for resumed training: each epoch is logged once, as step = epoch.

    - During `fit`, Keras also calls `on_test_end` after each validation pass; MLflow's callback
      logs those as `validation_*` at step 0 every epoch, duplicating `val_*`: not logged here.
    - Epochs are logged synchronously after the checkpoint is saved (this callback comes last).
      If the process dies between the two, the resumed run logs the missing epochs from the
      history CSV at its start, so MLflow never misses nor repeats an epoch.
    """

    def __init__(self, history_path: str | Path):
        super().__init__()
        self.history_path = Path(history_path)

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        if not self.history_path.exists():
            return
        run_id = mlflow.active_run().info.run_id
        logged = {point.step for point in mlflow.MlflowClient().get_metric_history(run_id, "loss")}
        for epoch, row in enumerate(read_history_rows(self.history_path)):
            if epoch not in logged:
                mlflow.log_metrics(row, step=epoch, synchronous=True)

    def on_epoch_end(self, epoch, logs=None):
        mlflow.log_metrics(logs, step=epoch, synchronous=True)

    def on_test_end(self, logs=None):
        pass


class RandomStateBackup(keras.callbacks.Callback):
    """Saves and restores the dropout layers' random state beside BackupAndRestore's checkpoint.

    Keras' weight files leave out SeedGenerator states, so a resumed run would draw other dropout
    masks than an uninterrupted one; with this, the two are bit-identical.
    """

    def __init__(self, backup_dir: str | Path):
        super().__init__()
        self.path = Path(backup_dir) / "random_state.npz"

    def _states(self):
        # Keyed by layer name: variable paths get process-wide counters and change between builds.
        return {layer.name: layer.seed_generator.state for layer in self.model.layers if hasattr(layer, "seed_generator")}

    def on_train_begin(self, logs=None):
        if self.path.exists():
            saved = np.load(self.path)
            for name, variable in self._states().items():
                variable.assign(saved[name])

    def on_epoch_end(self, epoch, logs=None):
        with atomic_path(self.path, suffix=".npz") as temporary:
            np.savez(temporary, **{name: np.asarray(variable) for name, variable in self._states().items()})


def augment(images: tf.Tensor, seed: tf.Tensor, flip: bool, crop_padding: int, cutout_size: int = 0) -> tf.Tensor:
    """Random horizontal flip, random crop of the reflect-padded image and cutout, per image, stateless in `seed`."""
    size = images.shape[1]
    if flip:
        images = tf.image.stateless_random_flip_left_right(images, seed=seed)
    if crop_padding:
        padded = tf.pad(images, [[0, 0], [crop_padding, crop_padding], [crop_padding, crop_padding], [0, 0]], mode="REFLECT")
        offsets = tf.random.stateless_uniform(
            [tf.shape(images)[0], 2], seed=seed[::-1], minval=0, maxval=2 * crop_padding + 1, dtype=tf.int32
        )
        rows = offsets[:, :1] + tf.range(size)[None, :]
        columns = offsets[:, 1:] + tf.range(size)[None, :]
        images = tf.gather(tf.gather(padded, rows, axis=1, batch_dims=1), columns, axis=2, batch_dims=1)
    if cutout_size:
        # The square's centre is anywhere in the image, so it may hang over an edge (DeVries & Taylor, 2017).
        corners = tf.random.stateless_uniform(
            [tf.shape(images)[0], 2], seed=tf.random.experimental.stateless_fold_in(seed, 1), minval=0, maxval=size, dtype=tf.int32
        ) - cutout_size // 2
        pixels = tf.range(size)[None, :]
        inside_rows = (pixels >= corners[:, :1]) & (pixels < corners[:, :1] + cutout_size)
        inside_columns = (pixels >= corners[:, 1:]) & (pixels < corners[:, 1:] + cutout_size)
        inside = inside_rows[:, :, None, None] & inside_columns[:, None, :, None]
        images = tf.where(inside, tf.zeros_like(images), images)
    return images


def make_dataset(
    split: Split,
    batch_size: int,
    shuffle_seed: int | None = None,
    first_epoch: int = 0,
    random_flip: bool = False,
    random_crop_padding: int = 0,
    cutout_size: int = 0,
    one_hot_classes: int = 0,
) -> tf.data.Dataset:
    """Batches of (images, labels) of the split, read from its file batch by batch (ImageReader).

    With `shuffle_seed`, the stream never ends and epoch e is a fresh permutation that depends
    only on (seed, e), as `model.fit(shuffle=True)` but stateless; augmentation draws from
    (seed, e, batch): training resumed at epoch k sees exactly the batches an uninterrupted run
    would (fit with `steps_per_epoch`). Without it, one pass in order, never augmented.
    With `one_hot_classes`, labels are one-hot vectors of that length (for label smoothing).
    """
    reader = ImageReader(split)
    labels = tf.constant(np.asarray(split.labels))
    count = len(split.labels)
    image_shape = split.images.shape[1:]

    def read(index):
        # Reading is deterministic, so tf.data may run it in parallel and ahead of the model.
        images = tf.numpy_function(reader, [index], tf.float32, stateful=False)
        batch_labels = tf.gather(labels, index)
        if one_hot_classes:
            batch_labels = tf.one_hot(batch_labels, one_hot_classes)
        return tf.ensure_shape(images, [None, *image_shape]), batch_labels

    if shuffle_seed is None:
        return tf.data.Dataset.range(count).batch(batch_size).map(read).prefetch(tf.data.AUTOTUNE)

    seed = tf.constant(shuffle_seed, tf.int64)

    def epoch_batches(epoch):
        order = tf.random.experimental.stateless_shuffle(tf.range(count, dtype=tf.int64), seed=tf.stack([seed, epoch]))
        numbered = tf.data.Dataset.from_tensor_slices(order).batch(batch_size).enumerate()
        return numbered.map(lambda number, index: (tf.stack([seed + 1, epoch * 1_000_000 + number]), index))

    def read_and_augment(batch_seed, index):
        images, batch_labels = read(index)
        if random_flip or random_crop_padding or cutout_size:
            images = augment(images, batch_seed, random_flip, random_crop_padding, cutout_size)
        return images, batch_labels

    batches = tf.data.Dataset.range(first_epoch, tf.int64.max).flat_map(epoch_batches)
    return batches.map(read_and_augment, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def one_hot_labels(params: TrainParams, num_classes: int) -> int:
    """Label smoothing needs one-hot targets: their length, or 0 for class indices."""
    return num_classes if params.label_smoothing else 0


def training_dataset(params: TrainParams, split: Split, seed: int, num_classes: int, first_epoch: int = 0) -> tf.data.Dataset:
    """The endless, shuffled and augmented training stream that `params` describe (see make_dataset)."""
    return make_dataset(
        split,
        params.batch_size,
        shuffle_seed=seed,
        first_epoch=first_epoch,
        random_flip=params.random_flip,
        random_crop_padding=params.random_crop_padding,
        cutout_size=params.cutout_size,
        one_hot_classes=one_hot_labels(params, num_classes),
    )


def peak_learning_rate(params: TrainParams) -> float:
    """`learning_rate`, scaled to the batch size when `lr_batch_scaling` asks (linear: Goyal et al., 2017)."""
    ratio = params.batch_size / params.lr_reference_batch_size
    return params.learning_rate * {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[params.lr_batch_scaling]


def learning_rate(params: TrainParams, steps_per_epoch: int) -> float | keras.optimizers.schedules.LearningRateSchedule:
    """The learning rate, or per-step schedule: `warmup_cosine` rises linearly from
    peak / 25 to the peak over `warmup_fraction` of all steps, then follows a cosine down to 0
    (the one-cycle shape). The peak is peak_learning_rate."""
    peak = peak_learning_rate(params)
    if params.lr_schedule == "constant":
        return peak
    total_steps = params.epochs * steps_per_epoch
    warmup_steps = int(params.warmup_fraction * total_steps)
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=peak / 25 if warmup_steps else peak,
        decay_steps=max(total_steps - warmup_steps, 1),
        warmup_target=peak if warmup_steps else None,
        warmup_steps=warmup_steps,
        alpha=0.0,
    )


def make_optimizer(params: TrainParams, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    rate = learning_rate(params, steps_per_epoch)
    weight_decay = params.weight_decay or None
    if params.optimizer == "adam":
        return keras.optimizers.Adam(learning_rate=rate)
    if params.optimizer == "adamw":
        return keras.optimizers.AdamW(learning_rate=rate, weight_decay=params.weight_decay)
    return keras.optimizers.SGD(learning_rate=rate, momentum=params.momentum, nesterov=params.momentum > 0, weight_decay=weight_decay)


def build_compiled_model(params: TrainParams, num_classes: int, steps_per_epoch: int) -> keras.Model:
    model = build_alexnet8(num_classes=num_classes, dense_units=params.dense_units, dropout=params.dropout)
    if params.label_smoothing:
        # Smoothing needs one-hot targets (make_dataset's one_hot_classes); same metric names either way.
        loss = keras.losses.CategoricalCrossentropy(label_smoothing=params.label_smoothing)
        accuracy = keras.metrics.CategoricalAccuracy(name="accuracy")
    else:
        loss = keras.losses.SparseCategoricalCrossentropy()
        accuracy = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
    model.compile(
        optimizer=make_optimizer(params, steps_per_epoch),
        loss=loss,
        metrics=[accuracy],
        jit_compile=params.jit_compile,
    )
    return model


def completed_epochs(backup_dir: str | Path) -> int:
    """Epochs finished by an interrupted run whose BackupAndRestore state is in `backup_dir` (0 if none)."""
    metadata = Path(backup_dir) / "training_metadata.json"
    try:
        return int(json.loads(metadata.read_text())["epoch"])
    except FileNotFoundError:
        return 0
    except (ValueError, KeyError, TypeError) as error:
        raise PipelineError(f"{metadata}: unreadable training state ({error}); delete {backup_dir} to start over") from None


def keep_history_rows(path: Path, epochs: int) -> None:
    """Cut the history CSV to its first `epochs` rows: an epoch redone after a crash is not listed twice."""
    if path.exists():
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        with atomic_path(path) as temporary:
            temporary.write_text("".join(lines[: 1 + epochs]), encoding="utf-8")


def train_model(
    params: TrainParams,
    seed: int,
    train_split: Split,
    validation_split: Split,
    num_classes: int,
    backup_dir: str | Path,
    log_to_mlflow: bool = False,
    callbacks: Sequence[keras.callbacks.Callback] = (),
) -> tuple[keras.Model, dict[str, list[float]]]:
    """Build, compile and fit AlexNet8, resuming from `backup_dir` if an earlier run was interrupted.

    `backup_dir` holds Keras' BackupAndRestore state, the dropout layers' random state and the
    history CSV; the caller deletes it once the model is safe. Returns the model and the per-epoch
    history of all epochs, including those of the interrupted run.
    """
    keras.utils.set_random_seed(seed)
    backup_dir = Path(backup_dir)
    first_epoch = completed_epochs(backup_dir)
    if first_epoch:
        logger.info("resuming from %s after epoch %d of %d", backup_dir, first_epoch, params.epochs)
    backup_dir.mkdir(parents=True, exist_ok=True)
    history_path = backup_dir / "history.csv"
    keep_history_rows(history_path, first_epoch)

    steps_per_epoch = math.ceil(len(train_split.labels) / params.batch_size)
    with distribution_strategy().scope():
        model = build_compiled_model(params, num_classes, steps_per_epoch)
    # BackupAndRestore needs a built optimizer to restore its state into.
    model.optimizer.build(model.trainable_variables)
    model.fit(
        training_dataset(params, train_split, seed, num_classes, first_epoch=first_epoch),
        validation_data=make_dataset(validation_split, params.batch_size, one_hot_classes=one_hot_labels(params, num_classes)),
        epochs=params.epochs,
        steps_per_epoch=steps_per_epoch,
        shuffle=False,  # the dataset shuffles itself, per epoch
        callbacks=[
            keras.callbacks.TerminateOnNaN(),
            # Everything an epoch leaves is written before BackupAndRestore's checkpoint, which
            # marks the epoch done; MLflow is told after it (see EpochMetricsToMlflow).
            keras.callbacks.CSVLogger(str(history_path), append=True),
            RandomStateBackup(backup_dir),
            keras.callbacks.BackupAndRestore(str(backup_dir), delete_checkpoint=False),
            *([EpochMetricsToMlflow(history_path)] if log_to_mlflow else []),
            *callbacks,
        ],
        verbose=2,
    )
    rows = read_history_rows(history_path)
    history = {name: [row[name] for row in rows] for name in (rows[0] if rows else {})}
    losses = history.get("loss", [])
    if len(losses) < params.epochs or not np.all(np.isfinite(losses)):
        shutil.rmtree(backup_dir, ignore_errors=True)  # a diverged state is nothing to resume from
        raise TrainingDiverged(
            f"training stopped at epoch {len(losses)} of {params.epochs}: the loss became "
            f"{losses[-1] if losses else 'NaN'}; try a smaller train.learning_rate. No model was saved."
        )
    return model, history


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


def log_model(model: keras.Model, example_images: np.ndarray, registered_model_name: str | None = None) -> None:
    """Log the model as an MLflow Keras model (a LoggedModel) with its signature and an input example;
    with `registered_model_name`, also as a new version of that registered model."""
    example_images = np.asarray(example_images[:2])
    signature = infer_signature(example_images, model.predict(example_images, verbose=0))
    mlflow.models.Model.log(
        artifact_path=None,
        name="model",
        flavor=_KERAS_FLAVOR,
        model=model,
        signature=signature,
        input_example=example_images,
        registered_model_name=registered_model_name,
        # Stating the requirements skips MLflow's inference, which reloads the model in a subprocess.
        pip_requirements=[f"keras=={keras.__version__}", f"tensorflow=={tf.__version__}"],
    )


def log_run_inputs(params: Params, params_file: str | Path, data_tags: dict[str, str]) -> None:
    """Into the active run: every param, the provenance tags (with `data_tags`), and as artifacts
    the params file, dvc.lock (if any) and the installed packages."""
    # The rate actually used, after lr_batch_scaling: the one to compare across batch sizes.
    mlflow.log_params(params.flat() | {"derived.peak_learning_rate": peak_learning_rate(params.train)})
    mlflow.set_tags(provenance_tags() | data_tags)
    mlflow.log_artifact(str(params_file), artifact_path="provenance")
    if Path("dvc.lock").exists():  # the upstream stages' data and code hashes, as of this run
        mlflow.log_artifact("dvc.lock", artifact_path="provenance")
    mlflow.log_text(installed_packages(), "provenance/packages.txt")


def training_key(params: Params, description: dict) -> str:
    """A digest of everything a checkpoint depends on: train params, seed and the prepared data."""
    identity = {"train": params.train.model_dump(), "seed": params.seed, "data": description}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def backup_folder(checkpoints: str | Path, key: str) -> Path:
    """The backup folder for `key`, after deleting any left by runs with other params or data.

    A checkpoint made with other params or data must never be resumed; keying the folder by
    `training_key` guarantees it, and deleting the others keeps at most one on disk.
    """
    checkpoints = Path(checkpoints)
    if checkpoints.is_dir():
        for stale in checkpoints.iterdir():
            if stale.name != key:
                logger.info("deleting %s: it was made with other params or data", stale)
                shutil.rmtree(stale, ignore_errors=True)
    return checkpoints / key


def configure_runtime(params: TrainParams) -> None:
    """Process-wide TensorFlow settings the params ask for; call before building the model."""
    if params.deterministic:
        # Same seed, data and machine -> bit-identical weights (see README, "Reproducibility").
        tf.config.experimental.enable_op_determinism()
    keras.mixed_precision.set_global_policy(params.precision)


def distribution_strategy() -> tf.distribute.Strategy:
    """Mirror over all GPUs when there are several; otherwise TensorFlow's default (one device)."""
    gpus = tf.config.list_logical_devices("GPU")
    if len(gpus) > 1:
        logger.info("training on %d GPUs with MirroredStrategy", len(gpus))
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def main(argv: Sequence[str] | None = None) -> None:
    argument_parser = cli.parser(__doc__.splitlines()[0])
    argument_parser.add_argument("--data", required=True, help="prepared dataset folder")
    argument_parser.add_argument("--model", required=True, help="where to save the model (.keras)")
    argument_parser.add_argument("--history", required=True, help="per-epoch history CSV")
    argument_parser.add_argument("--metrics", required=True, help="final training metrics JSON")
    argument_parser.add_argument("--run-file", required=True, help="JSON naming the MLflow run")
    argument_parser.add_argument(
        "--checkpoints", required=True, help="folder for the state of an interrupted training (not a DVC output)"
    )
    arguments = argument_parser.parse_args(argv)
    params = load_params(arguments.params)
    check_tracking_server()

    description = load_description(arguments.data)
    train_split = load_split(arguments.data, "train")
    validation_split = load_split(arguments.data, "validation")
    backup_dir = backup_folder(arguments.checkpoints, training_key(params, description))
    configure_runtime(params.train)

    with start_pipeline_run(
        params.mlflow.experiment_name, run_name(params), arguments.run_file, resume_from=backup_dir / "mlflow_run.json"
    ):
        data_tags = {
            "data.archive_md5": description["archive_md5"],
            "data.prepared_md5": dataset_digest(arguments.data),
            "data.sizes": str(description["sizes"]),
        }
        log_run_inputs(params, arguments.params, data_tags)
        model, history = train_model(
            params.train,
            params.seed,
            train_split,
            validation_split,
            num_classes=len(description["class_names"]),
            backup_dir=backup_dir,
            log_to_mlflow=True,
        )
        with atomic_path(arguments.model, suffix=".keras") as temporary:
            model.save(temporary)
        logger.info("saved %s", arguments.model)
        with atomic_path(arguments.history) as temporary:
            shutil.copyfile(backup_dir / "history.csv", temporary)
        write_json(arguments.metrics, {name: values[-1] for name, values in history.items()})
        log_model(model, train_split.images, registered_model_name=params.mlflow.registered_model_name or None)
    shutil.rmtree(backup_dir, ignore_errors=True)


if __name__ == "__main__":
    cli.run(main)
