"""Stage `evaluate`: assemble the served model, score it, log and register it.

Reads: the model `--model`, the prepared folder `--data` (test and validation splits, class
names, the archive's md5), the run file `--run-file` (the training's MLflow run); params
`evaluate.*`, `fetch.url`, `mlflow.registered_model_name`.
Writes: `--metrics` (JSON: test accuracy and loss, validation accuracy as served, for `dvc
metrics`; MLflow gets these, the validation loss and each class's accuracy), `--predictions`
(CSV: actual and predicted class of every test image, for `dvc plots` and the plot stage) and
`--served-model` (JSON: the evaluation's run, the logged model and its registered version, for
`predict`).

The served model is the trained network with the test-time views `evaluate.*` set
(image_classifier.py); it is scored through the very code that serves it, so every number here
is what its users get. Each evaluation is its own MLflow run, nested under the training's run,
with the `evaluate.*` params, the metrics and the logged model; with a registered model name the
model is a new version, made the `candidate`, and the `champion` if it is the best on the same
test images (registry.py). A changed `evaluate.*` param makes a new version without retraining.
"""

from __future__ import annotations

import argparse
import logging
import zipfile
from pathlib import Path

import keras
import mlflow
import numpy as np
import pandas as pd

from alexnet8.dataset import DATASET_FILE, ImageReader, Split, load_description, load_split
from alexnet8.errors import DataError
from alexnet8.files import write_json
from alexnet8.image_classifier import ImageClassifier, view_config, views_per_image
from alexnet8.metric_names import EVALUATE_HEADLINE, headline
from alexnet8.params import Params
from alexnet8.progress import progress_bar
from alexnet8.registry import Evaluation, promote
from alexnet8.reports import write_predictions
from alexnet8.run_record import RunRecord, read_run_file
from alexnet8.served_model import ServedModelRecord, log_classifier, version_description, write_record
from alexnet8.tracking import archive_dataset, provenance_tags, start_evaluation_run, use_project_store

logger = logging.getLogger(__name__)

PER_CLASS_TABLE = "test_per_class.json"  # in the evaluation's run: MLflow shows it as a table


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


def evaluate_model(
    classifier: ImageClassifier, split: Split, batch_size: int, split_name: str = "test"
) -> tuple[dict, np.ndarray]:
    """Loss, accuracy and per-class accuracy on the split, and the predicted class of
    every image, as the served model answers (`classifier.probabilities`, its test-time views
    included). Images are read batch by batch (ImageReader), so the split is never copied."""
    labels = np.asarray(split.labels).astype(np.int64)
    reader = ImageReader(split)
    batches = []
    with progress_bar(len(labels), f"predicting the {split_name} split", "images") as progress:
        for start in range(0, len(labels), batch_size):
            images = reader(np.arange(start, min(start + batch_size, len(labels))))
            batches.append(classifier.probabilities(images))
            progress.update(len(images))
    probabilities = np.concatenate(batches)
    predicted = probabilities.argmax(axis=1)
    loss = float(keras.losses.SparseCategoricalCrossentropy()(labels, probabilities))
    per_class = {
        name: float(np.mean(predicted[labels == index] == index)) if np.any(labels == index) else None
        for index, name in enumerate(classifier.class_names)
    }
    metrics = {"accuracy": float(np.mean(predicted == labels)), "loss": loss, "per_class_accuracy": per_class}
    return metrics, predicted


def score(
    classifier: ImageClassifier, test_split: Split, prepared_dir: str | Path, batch_size: int
) -> tuple[dict[str, float], dict[str, float | None], np.ndarray]:
    """The served model's test metrics, and its validation metrics as served (recipes, test-time
    views included, are chosen on validation accuracy, never on test); each class's test
    accuracy; the predicted class of every test image."""
    test, predicted = evaluate_model(classifier, test_split, batch_size)
    validation, _ = evaluate_model(classifier, load_split(prepared_dir, "validation"), batch_size, "validation")
    metrics = {
        "test/accuracy": test["accuracy"],
        "test/loss": test["loss"],
        "val_served/accuracy": validation["accuracy"],
        "val_served/loss": validation["loss"],
    }
    return metrics, test["per_class_accuracy"], predicted


def main(arguments: argparse.Namespace, params: Params) -> None:
    """The stage, as `python -m alexnet8 evaluate` runs it: `arguments` are its options, `params` validated."""
    training = read_run_file(arguments.run_file)  # a missing or damaged one fails before the scoring
    description = load_description(arguments.data)
    class_names = description.class_names
    views = view_config(params.evaluate.flip_tta, params.evaluate.tta_translate)
    classifier = ImageClassifier.assembled(load_trained_model(arguments.model), class_names, views)
    test_split = load_split(arguments.data, "test")
    metrics, per_class_accuracy, predicted = score(classifier, test_split, arguments.data, params.evaluate.batch_size)
    labels = np.asarray(test_split.labels)
    evaluation = Evaluation(int(np.sum(predicted == labels)), len(labels), description.archive_md5)
    training_name = training_run_name(training)
    with start_evaluation_run(arguments.run_file, f"{training_name} (evaluate)") as run:
        evaluate_params = {f"evaluate.{key}": value for key, value in params.evaluate.model_dump().items()}
        mlflow.log_params(evaluate_params)
        mlflow.set_tags(provenance_tags() | {"data.archive_md5": description.archive_md5})
        logged = log_classifier(
            arguments.model,
            Path(arguments.data) / DATASET_FILE,
            class_names,
            views,
            example_images=test_split.images[:2],
            name=training_name,
            params=evaluate_params,
            registered_model_name=params.mlflow.registered_model_name or None,
        )
        mlflow.log_metrics(
            metrics,
            model_id=logged.model_id,  # the logged model shows them, with its data set
            dataset=archive_dataset(params.fetch.url, description.archive_md5),
        )
        mlflow.log_table(per_class_table(per_class_accuracy, labels, class_names), PER_CLASS_TABLE)
        version = logged.registered_model_version
        if version is not None:
            register(params.mlflow.registered_model_name, str(version), evaluation, class_names, views)
        write_json(arguments.metrics, headline(metrics, EVALUATE_HEADLINE))
        write_predictions(arguments.predictions, labels, predicted, class_names)
        mlflow.log_artifact(arguments.metrics)
        served = ServedModelRecord(
            run_id=run.info.run_id,
            training_run_id=training.run_id,
            model_id=logged.model_id,
            model_uri=logged.model_uri,
            views=views,
            registered_model=params.mlflow.registered_model_name if version is not None else None,
            version=str(version) if version is not None else None,
        )
        write_record(arguments.served_model, served)
    logger.info(
        "served model (%d view(s) per image): test/accuracy %.4f, test/loss %.4f, val_served/accuracy %.4f",
        views_per_image(views),
        metrics["test/accuracy"],
        metrics["test/loss"],
        metrics["val_served/accuracy"],
    )


def register(name: str, version: str, evaluation: Evaluation, class_names: list[str], views: dict) -> None:
    """Describe the new version of `name` (what it takes and answers, how it scored), then promote it."""
    description = version_description(class_names, views, evaluation.describe())
    mlflow.MlflowClient().update_model_version(name, version, description)
    promote(name, version, evaluation)


def training_run_name(training: RunRecord) -> str:
    """The training run's name (the evaluation run and the logged model are named after it)."""
    use_project_store()
    return mlflow.MlflowClient().get_run(training.run_id).info.run_name


def per_class_table(accuracy: dict[str, float | None], labels: np.ndarray, class_names: list[str]) -> pd.DataFrame:
    """Each class's test images and the fraction of them the served model gets right."""
    return pd.DataFrame(
        {
            "class": class_names,
            "test images": [int(np.sum(labels == index)) for index in range(len(class_names))],
            "accuracy": [accuracy[name] for name in class_names],
        }
    )
