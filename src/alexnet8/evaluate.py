"""Stage `evaluate`: score the trained model on the test split.

Reads: the model `--model`, the prepared folder `--data` (test and validation splits, class
names), the run file `--run-file`; params `evaluate.*`.
Writes: `--metrics` (JSON: test accuracy, test loss, accuracy per class, and validation accuracy
and loss with the same test-time augmentation, for `dvc metrics`) and
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
            f"{path} is not a Keras model file (damaged or cut short?): restore it with `dvc checkout --force {path}`, "
            "or run the train stage again"
        )
    try:
        return keras.models.load_model(path, safe_mode=True)
    except (ValueError, OSError, KeyError, zipfile.BadZipFile) as error:
        if "safe_mode" in str(error):
            raise DataError(f"{path}: Keras safe mode refuses the code this model file holds: {error}") from None
        raise DataError(f"{path}: cannot load the model: {error}") from None


def tta_probabilities(model: keras.Model, images: np.ndarray, flip: bool = False, translate: int = 0) -> np.ndarray:
    """Class probabilities of a batch of raw images, averaged over test-time views.

    With `flip`, each view's are the mean of its own and its mirror image's. With `translate`,
    the image shifted `translate` pixels up-left and down-right (reflect-padded) are two more
    views, weighted 1/4 each against 1/2 for the unshifted image, as airbench's TTA (Jordan, 2024).
    """

    def view_probabilities(view):
        probabilities = model.predict_on_batch(view)
        return (probabilities + model.predict_on_batch(view[:, :, ::-1])) / 2 if flip else probabilities

    probabilities = view_probabilities(images)
    if translate:
        size = images.shape[1]
        padded = np.pad(images, [(0, 0), (translate, translate), (translate, translate), (0, 0)], mode="reflect")
        shifted = (padded[:, :size, :size], padded[:, 2 * translate :, 2 * translate :])
        probabilities = probabilities / 2 + sum(view_probabilities(view) for view in shifted) / 4
    return probabilities


def evaluate_model(
    model: keras.Model,
    split: Split,
    class_names: Sequence[str],
    batch_size: int,
    flip_tta: bool = False,
    tta_translate: int = 0,
    split_name: str = "test",
) -> tuple[dict, np.ndarray]:
    """Loss, accuracy and per-class accuracy on the split; and the predicted class of every image.

    Probabilities come from tta_probabilities with `flip_tta` and `tta_translate`. Images are
    read batch by batch (ImageReader), so the split is never copied into the process.
    """
    labels = np.asarray(split.labels).astype(np.int64)
    reader = ImageReader(split)
    batches = []
    with progress_bar(len(labels), f"predicting the {split_name} split", "images") as progress:
        for start in range(0, len(labels), batch_size):
            images = reader(np.arange(start, min(start + batch_size, len(labels))))
            batches.append(tta_probabilities(model, images, flip_tta, tta_translate))
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
    tta = {"flip_tta": params.evaluate.flip_tta, "tta_translate": params.evaluate.tta_translate}
    with reopen_pipeline_run(arguments.run_file) as record:
        metrics, predicted = evaluate_model(model, test_split, class_names, params.evaluate.batch_size, **tta)
        # Recipes, test-time augmentation included, are chosen on validation accuracy, never on test.
        validation, _ = evaluate_model(
            model,
            load_split(arguments.data, "validation"),
            class_names,
            params.evaluate.batch_size,
            **tta,
            split_name="validation",
        )
        metrics["validation"] = {"accuracy": validation["accuracy"], "loss": validation["loss"]}
        write_json(arguments.metrics, metrics)
        write_predictions(arguments.predictions, np.asarray(test_split.labels), predicted, class_names)
        mlflow.log_metrics(
            {"test_accuracy": metrics["accuracy"], "test_loss": metrics["loss"]}
            | {"evaluated_val_accuracy": validation["accuracy"], "evaluated_val_loss": validation["loss"]}
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
    logger.info(
        "test accuracy %.4f, test loss %.4f (validation accuracy %.4f)",
        metrics["accuracy"],
        metrics["loss"],
        validation["accuracy"],
    )


if __name__ == "__main__":
    cli.run(main)
