"""The report files the stages hand to each other and to DVC: the training history (CSV, one row
per epoch: `epoch` from 1, then each metric under its name in metric_names) and the test
predictions (CSV, actual and predicted class of every test image).

Reads and writes only the paths its callers give.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from alexnet8.errors import DataError
from alexnet8.files import atomic_path
from alexnet8.metric_names import EPOCH_COLUMN


def _csv_rows(path: str | Path, written_by: str) -> list[dict[str, str]]:
    try:
        with open(path, newline="", encoding="utf-8") as stream:
            return list(csv.DictReader(stream))
    except FileNotFoundError:
        raise DataError(f"{path} not found: run the {written_by} stage first") from None


def history_rows(path: str | Path) -> list[dict[str, float]]:
    """The training history as one {metric: value} per epoch, in order (no `epoch` column)."""
    return [
        {name: float(value) for name, value in row.items() if name != EPOCH_COLUMN} for row in _csv_rows(path, "train")
    ]


def append_history_row(path: str | Path, epoch: int, metrics: dict[str, float]) -> None:
    """Add epoch `epoch`'s row (numbered from 1) to the history CSV, with its header if it is new.
    The row is flushed and fsynced: the epoch's checkpoint set, written next, copies the file."""
    path = Path(path)
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        if new:
            writer.writerow([EPOCH_COLUMN, *metrics])
        writer.writerow([epoch, *(repr(value) for value in metrics.values())])
        stream.flush()
        os.fsync(stream.fileno())


def history_columns(path: str | Path) -> dict[str, list[float]]:
    """The training history as metric -> its value after each epoch ({} for a history without epochs)."""
    rows = history_rows(path)
    return {name: [row[name] for row in rows] for name in (rows[0] if rows else {})}


def write_predictions(path: str | Path, labels: np.ndarray, predicted: np.ndarray, class_names: Sequence[str]) -> None:
    """Actual and predicted class name of every image, in order."""
    with atomic_path(path) as temporary, open(temporary, "w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(["actual", "predicted"])
        writer.writerows(
            (class_names[actual], class_names[guess]) for actual, guess in zip(labels, predicted, strict=True)
        )


def read_predictions(path: str | Path) -> list[tuple[str, str]]:
    """(actual, predicted) class names of every test image, as write_predictions wrote them."""
    return [(row["actual"], row["predicted"]) for row in _csv_rows(path, "evaluate")]
