"""Stage `evaluate`: score the trained model on the test split.

Reads: the model `--model`, the prepared folder `--data` (test split, class names), the run file
`--run-file`; param `evaluate.batch_size`.
Writes: `--metrics` (JSON: test accuracy, test loss, accuracy per class, for `dvc metrics`) and
`--predictions` (CSV: actual and predicted class of every test image, the confusion matrix's
source for `dvc plots` and the plot stage). Logs the test metrics into the training's MLflow run
and its logged model; with a registered model, makes the new version the `candidate` and, if it
beats the `champion` on test accuracy, the champion (registry.py).
"""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Sequence
from pathlib import Path

import keras
import mlflow
import numpy as np

from alexnet8 import cli
from alexnet8.dataset import ImageReader, Split, load_description, load_split
from alexnet8.errors import DataError
from alexnet8.files import write_json
from alexnet8.params import load_params
from alexnet8.progress import progress_bar
from alexnet8.registry import promote
from alexnet8.reports import write_predictions
from alexnet8.tracking import reopen_pipeline_run

logger = logging.getLogger(__name__)


def load_trained_model(path: str | Path) -> keras.Model:
    """Load a `.keras` model in Keras' safe mode: a model file can not run arbitrary code."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} not found: run the train stage first")
    if not zipfile.is_zipfile(path):  # a .keras file is a zip archive
        raise DataError(
            f"{path} is not a Keras model file (damaged or cut short?): restore it with `dvc checkout {path}`, "
            "or run the train stage again"
        )
    try:
        return keras.models.load_model(path, safe_mode=True)
    except (ValueError, OSError, KeyError, zipfile.BadZipFile) as error:
        if "safe_mode" in str(error):
            raise DataError(f"{path}: Keras safe mode refuses the code this model file holds: {error}") from None
        raise DataError(f"{path}: cannot load the model: {error}") from None


def evaluate_model(
    model: keras.Model, split: Split, class_names: Sequence[str], batch_size: int, flip_tta: bool = False
) -> tuple[dict, np.ndarray]:
    """Test loss, accuracy and per-class accuracy; and the predicted class of every image.

    With `flip_tta`, each image's probabilities are the mean of its own and its mirror image's.
    Images are read batch by batch (ImageReader), so the split is never copied into the process.
    """
    labels = np.asarray(split.labels).astype(np.int64)
    reader = ImageReader(split)
    batches = []
    with progress_bar(len(labels), "predicting the test split", "images") as progress:
        for start in range(0, len(labels), batch_size):
            images = reader(np.arange(start, min(start + batch_size, len(labels))))
            batch_probabilities = model.predict_on_batch(images)
            if flip_tta:
                batch_probabilities = (batch_probabilities + model.predict_on_batch(images[:, :, ::-1])) / 2
            batches.append(batch_probabilities)
            progress.update(len(images))
    probabilities = np.concatenate(batches)
    predicted = probabilities.argmax(axis=1)
    loss = float(keras.losses.SparseCategoricalCrossentropy()(labels, probabilities))
    per_class = {
        name: float(np.mean(predicted[labels == index] == index)) if np.any(labels == index) else None
        for index, name in enumerate(class_names)
    }
    metrics = {"accuracy": float(np.mean(predicted == labels)), "loss": loss, "per_class_accuracy": per_class}
    return metrics, predicted


def main(argv: Sequence[str] | None = None) -> None:
    arguments = cli.stage_parser("evaluate").parse_args(argv)
    params = load_params(arguments.params)

    class_names = load_description(arguments.data)["class_names"]
    test_split = load_split(arguments.data, "test")
    model = load_trained_model(arguments.model)
    with reopen_pipeline_run(arguments.run_file) as record:
        metrics, predicted = evaluate_model(
            model, test_split, class_names, params.evaluate.batch_size, params.evaluate.flip_tta
        )
        write_json(arguments.metrics, metrics)
        write_predictions(arguments.predictions, np.asarray(test_split.labels), predicted, class_names)
        mlflow.log_metrics(
            {"test_accuracy": metrics["accuracy"], "test_loss": metrics["loss"]}
            | {
                f"test_accuracy_{name}": value
                for name, value in metrics["per_class_accuracy"].items()
                if value is not None
            },
            model_id=record.get("model_id"),  # the logged model shows its test metrics too
        )
        mlflow.log_artifact(arguments.metrics)
        if record.get("model_version"):
            promote(record["registered_model"], record["model_version"], metrics["accuracy"])
    logger.info("test accuracy %.4f, test loss %.4f", metrics["accuracy"], metrics["loss"])


if __name__ == "__main__":
    cli.run(main)
