"""What training logs to MLflow through Keras: each epoch's metrics, and the trained model.

Reads: the training history CSV (to log epochs an interrupted run finished but did not log).
Writes: into the active MLflow run only.
"""

from __future__ import annotations

import os
import types
from pathlib import Path

import keras
import mlflow
import numpy as np
import tensorflow as tf
from mlflow.models import infer_signature

from alexnet8.reports import history_rows


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
        for epoch, row in enumerate(history_rows(self.history_path)):
            if epoch not in logged:
                mlflow.log_metrics(row, step=epoch, synchronous=True)

    def on_epoch_end(self, epoch, logs=None):
        mlflow.log_metrics(logs, step=epoch, synchronous=True)

    def on_test_end(self, logs=None):
        pass


def _save_keras_model(path: str, **kwargs) -> None:
    # mlflow.keras.save_model writes input_example.json into `path` before it creates `path`, so
    # mlflow.keras.log_model(..., input_example=...) fails with FileNotFoundError: mlflow/mlflow#16183
    # (open; its fix, #16300, was closed unmerged). Creating the folder first is all it lacks.
    # Remove this shim, and call mlflow.keras.log_model, once a locked MLflow saves with an example.
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
