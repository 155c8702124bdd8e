"""Stage `plot`: the original script's accuracy/loss figure, and the test confusion matrix, as PNGs.

Reads: the training history `--history` (CSV), the test predictions `--predictions` (CSV), the
class names from `--data`, and the run file `--run-file`.
Writes: `--curves` (training and validation accuracy beside training and validation loss, per
epoch, as the original script draws them) and `--confusion` (counts, rows = actual class), and
logs both into the training's MLflow run (at its artifact root).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

import mlflow
import numpy as np
from matplotlib.figure import Figure

from alexnet8.dataset import load_description
from alexnet8.errors import DataError
from alexnet8.files import atomic_path
from alexnet8.metric_names import FIRST_EPOCH
from alexnet8.reports import history_columns, read_predictions
from alexnet8.run_record import read_run_file
from alexnet8.tracking import reopen_pipeline_run

logger = logging.getLogger(__name__)

FIGURE_WIDTH_INCHES = 7.9


def read_history(path: str | Path) -> dict[str, np.ndarray]:
    """The train stage's history CSV as metric -> values, ordered by epoch; DataError if it has no epochs."""
    history = history_columns(path)
    if not history:
        raise DataError(f"{path}: no epochs recorded")
    return {metric: np.array(values) for metric, values in history.items()}


def confusion_matrix(pairs: Sequence[tuple[str, str]], class_names: Sequence[str]) -> np.ndarray:
    """Counts of (actual, predicted) class names, with rows = actual class, columns = predicted class."""
    index = {name: position for position, name in enumerate(class_names)}
    matrix = np.zeros((len(class_names), len(class_names)), dtype=np.int64)
    for actual, predicted in pairs:
        matrix[index[actual], index[predicted]] += 1
    return matrix


def curves_figure(history: dict[str, np.ndarray]) -> Figure:
    """Accuracy (left) and loss (right), training and validation, per epoch: the original's figure."""
    epochs = np.arange(FIRST_EPOCH, len(history["train/loss"]) + FIRST_EPOCH)
    # A Figure of its own, not pyplot's: no global state, no display backend (servers, CI).
    # 790 pixels wide at 100 dpi: `dvc plots diff` puts two revisions' figures side by side, and
    # both fit a 1,600-pixel page.
    figure = Figure(figsize=(FIGURE_WIDTH_INCHES, 3.8))
    accuracy_axes, loss_axes = figure.subplots(1, 2)
    for axes, metric, title in ((accuracy_axes, "accuracy", "Accuracy"), (loss_axes, "loss", "Loss")):
        axes.plot(epochs, history[f"train/{metric}"], marker="o", label=f"training (train/{metric})")
        axes.plot(epochs, history[f"val/{metric}"], marker="o", label=f"validation (val/{metric})")
        axes.set_title(f"Training and Validation {title}")
        axes.set_xlabel("epoch")
        axes.set_xticks(epochs)
        axes.legend(fontsize="small")
        axes.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def confusion_figure(matrix: np.ndarray, class_names: Sequence[str]) -> Figure:
    figure = Figure(figsize=(FIGURE_WIDTH_INCHES, 6.8))
    axes = figure.subplots()
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
        axes.text(
            column,
            row,
            str(count),
            ha="center",
            va="center",
            fontsize=8,
            color="white" if count > threshold else "black",
        )
    figure.tight_layout()
    return figure


def save_figure(figure: Figure, path: str | Path) -> None:
    with atomic_path(path, suffix=".png") as temporary:
        figure.savefig(temporary, dpi=100, format="png")
    logger.info("wrote %s", path)


def main(arguments: argparse.Namespace, params: None = None) -> None:
    """The stage, as `python -m alexnet8 plot` runs it (it reads no params)."""
    read_run_file(arguments.run_file)  # a missing or damaged one fails before anything is written
    class_names = load_description(arguments.data).class_names
    save_figure(curves_figure(read_history(arguments.history)), arguments.curves)
    save_figure(
        confusion_figure(confusion_matrix(read_predictions(arguments.predictions), class_names), class_names),
        arguments.confusion,
    )
    with reopen_pipeline_run(arguments.run_file):
        # At the artifact root: MLflow's Compare page shows only the root's files side by side.
        mlflow.log_artifact(arguments.curves)
        mlflow.log_artifact(arguments.confusion)
