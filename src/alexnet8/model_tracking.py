"""What training logs to MLflow besides its params: each epoch's metrics, and the trained model.

Reads: the training history CSV (to log epochs an interrupted run finished but did not log), the
saved `.keras` model and dataset.json (logged with the model).
Writes: into the active MLflow run only.
"""

from __future__ import annotations

import re
from pathlib import Path

import keras
import mlflow
import numpy as np
import tensorflow as tf
from mlflow.models import ModelSignature
from mlflow.types.schema import ColSpec, Schema, TensorSpec

from alexnet8 import classifier_model
from alexnet8.reports import history_rows

PIP_REQUIREMENTS = [
    f"keras=={keras.__version__}",
    f"tensorflow=={tf.__version__}",
    f"numpy=={np.__version__}",
]


class EpochMetricsToMlflow(keras.callbacks.Callback):
    """Logs each epoch's metrics once, as step = epoch, also when training was interrupted and resumed.

    Epochs are logged synchronously after the checkpoint is saved (this callback comes last). If
    the process dies between the two, the resumed run logs the missing epochs from the history
    CSV at its start, so MLflow never misses nor repeats an epoch. The network's summary is logged
    once, as `model_summary.txt`.
    """

    def __init__(self, history_path: str | Path):
        super().__init__()
        self.history_path = Path(history_path)

    def on_train_begin(self, logs=None):
        lines = []
        self.model.summary(print_fn=lambda line, *args, **kwargs: lines.append(line))
        mlflow.log_text("\n".join(lines) + "\n", "model_summary.txt")
        if not self.history_path.exists():
            return
        run_id = mlflow.active_run().info.run_id
        logged = {point.step for point in mlflow.MlflowClient().get_metric_history(run_id, "loss")}
        for epoch, row in enumerate(history_rows(self.history_path)):
            if epoch not in logged:
                mlflow.log_metrics(row, step=epoch, synchronous=True)

    def on_epoch_end(self, epoch, logs=None):
        mlflow.log_metrics(logs, step=epoch, synchronous=True)


def classifier_signature(class_names: list[str]) -> ModelSignature:
    """uint8 RGB pixels (n, 32, 32, 3) in; the class name and each class's probability out."""
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, *classifier_model.IMAGE_SHAPE))]),
        outputs=Schema([ColSpec("string", "class"), *(ColSpec("double", name) for name in class_names)]),
    )


def log_classifier(
    model_path: str | Path,
    dataset_file: str | Path,
    class_names: list[str],
    example_images: np.ndarray,
    name: str,
    step: int,
    registered_model_name: str | None = None,
) -> mlflow.models.model.ModelInfo:
    """Log the trained model as an MLflow model that takes raw pixels and answers with class names
    (classifier_model.py), linked to the metrics of epoch `step`; with `registered_model_name`,
    also as a new version of that registered model."""
    return mlflow.pyfunc.log_model(
        name=re.sub(r"[/:.%\"']", "_", name),  # characters MLflow refuses in model names
        python_model=Path(classifier_model.__file__),
        artifacts={"keras_model": str(model_path), "dataset": str(dataset_file)},
        signature=classifier_signature(class_names),
        input_example=np.asarray(example_images[:2]),
        pip_requirements=PIP_REQUIREMENTS,
        registered_model_name=registered_model_name,
        step=step,
    )
