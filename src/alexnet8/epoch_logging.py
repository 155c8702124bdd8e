"""What training logs to MLflow besides its params: each epoch's metrics, and the network's summary.

Reads: the training history CSV (to log epochs an interrupted run finished but did not log).
Writes: into the active MLflow run only.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import keras
import mlflow
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException

from alexnet8.metric_names import FIRST_EPOCH, epoch_metrics
from alexnet8.reports import history_rows
from alexnet8.tracking import failure_reason, wait_for_tracking_server

logger = logging.getLogger(__name__)


class EpochMetricsAndSummaryToMlflow(keras.callbacks.Callback):
    """Logs the network's summary (`model_summary.txt`) and each epoch's metrics once, as step =
    the epoch's number (from 1), without ever holding training up.

    A background thread sends each epoch's metrics after its checkpoint is saved (this callback
    comes last). When the tracking server does not answer, training goes on at full speed: the
    epochs not sent are kept (they are in the history CSV anyway) and sent, in order, once the
    server answers again; what is still unsent when training ends is sent by `log_missing_epochs`
    once training has ended, or by the rerun, which calls it at its start. Before sending, the
    thread asks the run which epochs it has, so MLflow never misses nor repeats an epoch. Any other
    error (a bug, not a server away) stops the thread and is raised in training at the next epoch's end.
    """

    RETRY_SECONDS = 10  # between attempts while the server does not answer

    def __init__(self, history_path: str | Path):
        super().__init__()
        self.history_path = Path(history_path)

    def on_train_begin(self, logs=None):
        lines = []
        self.model.summary(print_fn=lambda line, *args, **kwargs: lines.append(line))
        self._run_id = mlflow.active_run().info.run_id
        self._summary: str | None = "\n".join(lines) + "\n"
        # The epochs an interrupted run finished but may not have logged: sent first, if missing.
        history = history_rows(self.history_path) if self.history_path.exists() else []
        self._unsent: dict[int, dict[str, float]] = dict(enumerate(history, start=FIRST_EPOCH))
        self._timestamps: dict[int, int] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()  # an epoch ended
        self._stop = threading.Event()  # training ended
        self._stopping = False
        self._server_away = False
        self._failure: BaseException | None = None  # what stopped the thread, raised in training
        self._sender = threading.Thread(target=self._send_loop, name="epoch-metrics-to-mlflow", daemon=True)
        self._sender.start()
        self._wake.set()

    def on_epoch_end(self, epoch, logs=None):
        number = epoch + 1  # Keras counts from 0; users see epochs from 1 (metric_names)
        with self._lock:
            self._unsent[number] = epoch_metrics(logs or {})
            self._timestamps[number] = int(time.time() * 1000)  # when the epoch ended, not when it is sent
        self._wake.set()
        self._raise_failure()

    def on_train_end(self, logs=None):
        # A last round sends the last epoch, unless the server is away (log_missing_epochs tries
        # again); joining waits for a request in flight, bounded by tracking.HTTP_REQUEST_BOUNDS.
        self._stopping = True
        self._stop.set()
        self._wake.set()
        self._sender.join()
        self._raise_failure()

    def _raise_failure(self):
        if self._failure is not None:
            raise RuntimeError("sending the epochs' metrics to MLflow failed") from self._failure

    def _send_loop(self):
        try:
            self._send_until_stopped()
        except BaseException as error:
            self._failure = error

    def _send_until_stopped(self):
        while True:
            if self._server_away:  # tried again every RETRY_SECONDS, not at each epoch's end
                self._stop.wait(timeout=self.RETRY_SECONDS)
            else:
                self._wake.wait(timeout=self.RETRY_SECONDS)
            self._wake.clear()
            stopping = self._stopping
            with self._lock:
                pending = bool(self._unsent) or self._summary is not None
            if pending and not (stopping and self._server_away):
                self._send()
            if stopping:
                return

    def _send(self):
        client = mlflow.MlflowClient()
        try:
            if self._summary is not None:
                client.log_text(self._run_id, self._summary, "model_summary.txt")
                self._summary = None
            logged = _logged_epochs(client, self._run_id)
            with self._lock:
                epochs = sorted(self._unsent)
            sent = []
            for epoch in epochs:
                if epoch not in logged:
                    with self._lock:
                        metrics, timestamp = self._unsent[epoch], self._timestamps.get(epoch)
                    _log_epoch(client, self._run_id, epoch, metrics, timestamp)
                    sent.append(epoch)
                with self._lock:
                    del self._unsent[epoch]
        except (MlflowException, OSError) as error:  # the server is away: keep the epochs, try again later
            if not self._server_away:
                self._server_away = True
                logger.warning(
                    "MLflow at %s does not answer (%s): training goes on; the metrics of epoch(s) %s are "
                    "kept and sent when it answers again",
                    mlflow.get_tracking_uri(),
                    failure_reason(error),
                    ", ".join(str(epoch) for epoch in sorted(self._unsent)) or "(none yet)",
                )
            return
        if self._server_away:
            self._server_away = False
            logger.info(
                "MLflow at %s answers again: sent the metrics of epoch(s) %s",
                mlflow.get_tracking_uri(),
                ", ".join(str(epoch) for epoch in sent) or "(none missing)",
            )


def _logged_epochs(client: mlflow.MlflowClient, run_id: str) -> set[int]:
    return {point.step for point in client.get_metric_history(run_id, "train/loss")}


def _log_epoch(
    client: mlflow.MlflowClient, run_id: str, epoch: int, metrics: dict[str, float], timestamp: int | None = None
) -> None:
    timestamp = timestamp or int(time.time() * 1000)
    client.log_batch(
        run_id,
        metrics=[Metric(name, value, timestamp, epoch) for name, value in metrics.items()],
        synchronous=True,
    )


def log_missing_epochs(history_path: str | Path) -> None:
    """Log, into the active run, the epochs of the history CSV that it does not have yet: those
    the tracking server missed while it did not answer. A server that does not answer is given
    a restart's time (tracking.RESTART_GRACE_SECONDS); MlflowException if it still does not."""
    silence = wait_for_tracking_server()
    if silence is not None:
        raise MlflowException(str(silence))
    client = mlflow.MlflowClient()
    run_id = mlflow.active_run().info.run_id
    logged = _logged_epochs(client, run_id)
    for epoch, row in enumerate(history_rows(history_path), start=FIRST_EPOCH):
        if epoch not in logged:
            _log_epoch(client, run_id, epoch, row)
