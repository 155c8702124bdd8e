"""Stage `plot`: the original script's accuracy/loss figure, and the test confusion matrix, as PNGs.

Reads: the training history `--history` (CSV), the test predictions `--predictions` (CSV), the
class names from `--data`, and the run file `--run-file`.
Writes: `--curves` (training and validation accuracy beside training and validation loss, per
epoch, as the original script draws them) and `--confusion` (counts, rows = actual class), and
logs both into the training's MLflow run under `figures/`.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI

import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import numpy as np  # noqa: E402

from alexnet8 import cli  # noqa: E402
from alexnet8.dataset import load_description, read_history_rows  # noqa: E402
from alexnet8.errors import DataError  # noqa: E402
from alexnet8.files import atomic_path  # noqa: E402
from alexnet8.tracking import resume_pipeline_run  # noqa: E402

logger = logging.getLogger(__name__)


def _read_csv(path: str | Path) -> list[dict[str, str]]:
    try:
        with open(path, newline="", encoding="utf-8") as stream:
            return list(csv.DictReader(stream))
    except FileNotFoundError:
        raise DataError(f"{path} not found: run the train and evaluate stages first") from None


def read_history(path: str | Path) -> dict[str, np.ndarray]:
    """The train stage's history CSV as metric -> values, ordered by epoch."""
    try:
        rows = read_history_rows(path)
    except FileNotFoundError:
        raise DataError(f"{path} not found: run the train stage first") from None
    if not rows:
        raise DataError(f"{path}: no epochs recorded")
    return {metric: np.array([row[metric] for row in rows]) for metric in rows[0]}


def confusion_matrix(predictions: list[dict[str, str]], class_names: Sequence[str]) -> np.ndarray:
    """Counts with rows = actual class, columns = predicted class."""
    index = {name: position for position, name in enumerate(class_names)}
    matrix = np.zeros((len(class_names), len(class_names)), dtype=np.int64)
    for row in predictions:
        matrix[index[row["actual"]], index[row["predicted"]]] += 1
    return matrix


def curves_figure(history: dict[str, np.ndarray]) -> plt.Figure:
    """Accuracy (left) and loss (right), training and validation, per epoch: the original's figure."""
    epochs = np.arange(1, len(history["loss"]) + 1)
    figure, (accuracy_axes, loss_axes) = plt.subplots(1, 2, figsize=(11, 4.2))
    for axes, metric, title in ((accuracy_axes, "accuracy", "Accuracy"), (loss_axes, "loss", "Loss")):
        axes.plot(epochs, history[metric], marker="o", label=f"Training {title}")
        axes.plot(epochs, history[f"val_{metric}"], marker="o", label=f"Validation {title}")
        axes.set_title(f"Training and Validation {title}")
        axes.set_xlabel("epoch")
        axes.set_xticks(epochs)
        axes.legend()
        axes.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def confusion_figure(matrix: np.ndarray, class_names: Sequence[str]) -> plt.Figure:
    figure, axes = plt.subplots(figsize=(7.5, 6.5))
    image = axes.imshow(matrix, cmap="Blues")
    figure.colorbar(image, ax=axes)
    axes.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    axes.set_yticks(range(len(class_names)), class_names)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("actual class")
    accuracy = np.trace(matrix) / max(matrix.sum(), 1)
    axes.set_title(f"Test confusion matrix (accuracy {accuracy:.3f})")
    threshold = matrix.max() / 2
    for (row, column), count in np.ndenumerate(matrix):
        axes.text(column, row, str(count), ha="center", va="center", fontsize=8, color="white" if count > threshold else "black")
    figure.tight_layout()
    return figure


def save_figure(figure: plt.Figure, path: str | Path) -> None:
    with atomic_path(path, suffix=".png") as temporary:
        figure.savefig(temporary, dpi=100, format="png")
    plt.close(figure)
    logger.info("wrote %s", path)


def main(argv: Sequence[str] | None = None) -> None:
    argument_parser = cli.parser(__doc__.splitlines()[0], reads_params=False)
    argument_parser.add_argument("--history", required=True, help="per-epoch history CSV")
    argument_parser.add_argument("--predictions", required=True, help="test predictions CSV")
    argument_parser.add_argument("--data", required=True, help="prepared dataset folder (for class names)")
    argument_parser.add_argument("--run-file", required=True, help="JSON naming the MLflow run")
    argument_parser.add_argument("--curves", required=True, help="accuracy/loss figure to write (PNG)")
    argument_parser.add_argument("--confusion", required=True, help="confusion matrix figure to write (PNG)")
    arguments = argument_parser.parse_args(argv)

    class_names = load_description(arguments.data)["class_names"]
    save_figure(curves_figure(read_history(arguments.history)), arguments.curves)
    save_figure(confusion_figure(confusion_matrix(_read_csv(arguments.predictions), class_names), class_names), arguments.confusion)
    with resume_pipeline_run(arguments.run_file):
        mlflow.log_artifact(arguments.curves, artifact_path="figures")
        mlflow.log_artifact(arguments.confusion, artifact_path="figures")


if __name__ == "__main__":
    cli.run(main)
