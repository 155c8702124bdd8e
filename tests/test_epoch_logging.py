"""What training logs to MLflow (epoch_logging.py): an error other than a server that is away fails training."""

from __future__ import annotations

from types import SimpleNamespace

import keras
import pytest

from alexnet8 import epoch_logging
from alexnet8.epoch_logging import EpochMetricsAndSummaryToMlflow


class _BrokenClient:
    """A client whose first request hits a bug, not a server that is away."""

    def log_text(self, *arguments, **options):
        raise TypeError("a bug in the request")


def test_an_error_other_than_a_server_away_fails_training_loudly(tmp_path, monkeypatch):
    run = SimpleNamespace(info=SimpleNamespace(run_id="run"))
    fake_mlflow = SimpleNamespace(active_run=lambda: run, MlflowClient=_BrokenClient, get_tracking_uri=lambda: "x")
    monkeypatch.setattr(epoch_logging, "mlflow", fake_mlflow)
    callback = EpochMetricsAndSummaryToMlflow(tmp_path / "history.csv")
    callback.set_model(keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)]))
    callback.on_train_begin()
    with pytest.raises(RuntimeError, match="sending the epochs' metrics to MLflow failed") as error:
        callback.on_train_end()
    assert isinstance(error.value.__cause__, TypeError)
