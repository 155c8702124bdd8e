"""Progress within each epoch of Keras' `fit`: a live bar on a terminal, a log line about every
tenth of an epoch otherwise, and one line with the epoch's metrics when it ends.

Reads nothing. Writes to the stream the project's logging writes to (see progress.py).
"""

from __future__ import annotations

import logging
import time
from typing import TextIO

import keras
from tqdm import tqdm

from alexnet8.metric_names import epoch_metrics
from alexnet8.progress import (
    TenthsLogger,
    bar_width_options,
    format_duration,
    in_reading_order,
    is_terminal,
    logging_stream,
    terminal_columns,
)

logger = logging.getLogger("alexnet8.progress")

# The epoch bar's rate is in images, computed by the callback and shown as its postfix with the
# running training loss and the whole run's ETA. Under NARROW_COLUMNS the bar drops its unit and
# the loss, so that at 80 columns the bar itself keeps a dozen characters.
_EPOCH_BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt}{unit} [{elapsed}<{remaining}{postfix}]"
_NARROW_BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]"
NARROW_COLUMNS = 110


class EpochProgress(keras.callbacks.Callback):
    """Progress within each epoch of `model.fit(..., verbose=0)`, and each epoch's metrics when it ends.

    On a terminal, a tqdm bar per epoch: steps, images/s, time left, running loss and accuracy.
    Otherwise a log line about every 10% of the epoch: `epoch k/n: s/S steps (p%), r images/s,
    elapsed, ETA`. Both end each epoch with the same log line: seconds of training and of
    validation, images/s, and the epoch's metrics (train/loss, train/accuracy, val/loss, val/accuracy).

    `steps_per_epoch` and `batch_size` are what fit is given (fit only knows the steps of an
    endless dataset when told them). Epochs are numbered from the index fit passes to
    `on_epoch_begin`, so a run resumed at epoch 3 shows `epoch 3/5`.

    Cost per step: one clock read and one comparison in log mode; a tqdm update (it redraws at
    most 10 times a second) in bar mode. The Keras TensorFlow backend converts every step's
    logs to Python floats for all callbacks anyway (CallbackList.on_train_batch_end), so
    reading them here adds no synchronisation.
    """

    def __init__(
        self, steps_per_epoch: int, batch_size: int, stream: TextIO | None = None, terminal: bool | None = None
    ):
        super().__init__()
        if steps_per_epoch < 1 or batch_size < 1:
            raise ValueError(
                f"steps_per_epoch and batch_size must be at least 1, got {steps_per_epoch} and {batch_size}"
            )
        self.steps_per_epoch = steps_per_epoch
        self.batch_size = batch_size
        self.stream = stream
        self.terminal = terminal
        self._bar: tqdm | None = None
        self._reporter: TenthsLogger | None = None
        self._in_epoch = False

    def _use_bar(self) -> bool:
        # Decided at each fit, not at construction: logging may be configured after the callback is made.
        stream = logging_stream() if self.stream is None else self.stream
        return is_terminal(stream) if self.terminal is None else self.terminal

    def _label(self, epoch: int) -> str:
        epochs = self.params.get("epochs") if self.params else None
        return f"epoch {epoch + 1}/{epochs}" if epochs else f"epoch {epoch + 1}"

    def on_train_begin(self, logs=None):
        self._bar_mode = self._use_bar()

    def _run_eta(self, now: float) -> str:
        """The time left in the whole run: this epoch's steps at its rate so far, then each later
        epoch as long as the finished ones took (or this epoch's rate, during the first)."""
        epochs = self.params.get("epochs") if self.params else None
        if not epochs or not self._steps_done:
            return ""
        seconds_per_step = (now - self._started) / self._steps_done
        per_epoch = (
            sum(self._epoch_seconds) / len(self._epoch_seconds)
            if self._epoch_seconds
            else seconds_per_step * self.steps_per_epoch
        )
        left = seconds_per_step * (self.steps_per_epoch - self._steps_done) + per_epoch * (epochs - self._epoch - 1)
        return f"run ETA {format_duration(left)}"

    def on_epoch_begin(self, epoch, logs=None):
        self._close_bar()
        self._epoch = epoch
        if not hasattr(self, "_epoch_seconds"):
            self._epoch_seconds: list[float] = []
        self._in_epoch = True
        self._steps_done = 0
        self._training_postfix = ""
        self._validation_started: float | None = None
        label = self._label(epoch)
        self._started = time.monotonic()
        if self._bar_mode:
            stream = logging_stream() if self.stream is None else self.stream
            self._narrow = 0 < terminal_columns(stream) < NARROW_COLUMNS
            self._bar = tqdm(
                total=self.steps_per_epoch,
                desc=label,
                unit=" steps",
                file=stream,
                bar_format=_NARROW_BAR_FORMAT if self._narrow else _EPOCH_BAR_FORMAT,
                smoothing=0,
                **bar_width_options(stream),
            )
        else:
            self._reporter = TenthsLogger(
                self.steps_per_epoch, label, "steps", rate_unit="images", rate_scale=self.batch_size
            )

    def on_train_batch_end(self, batch, logs=None):
        # `batch` is the index of the last step run (several with steps_per_execution > 1).
        self._steps_done = batch + 1
        if self._reporter is not None:
            self._reporter.update_to(self._steps_done)
        elif self._bar is not None:
            now = time.monotonic()
            elapsed = now - self._started
            images_per_second = self._steps_done * self.batch_size / elapsed if elapsed > 0 else 0.0
            loss = epoch_metrics(logs or {}).get("train/loss")
            parts = [f"{images_per_second:.0f} img/s" if self._narrow else f"{images_per_second:.1f} images/s"]
            if loss is not None and not self._narrow:
                parts.append(f"train/loss {loss:.4f}")
            if eta := self._run_eta(now):
                parts.append(eta)
            self._training_postfix = ", ".join(parts)
            self._bar.set_postfix_str(self._training_postfix, refresh=False)
            self._bar.update(self._steps_done - self._bar.n)

    def on_test_begin(self, logs=None):
        # fit's validation pass; model.evaluate outside fit calls this too, and is not timed.
        if not self._in_epoch:
            return
        self._validation_started = time.monotonic()
        if self._bar is not None:
            self._bar.set_postfix_str(f"{self._training_postfix}, validating", refresh=True)

    def on_epoch_end(self, epoch, logs=None):
        ended = time.monotonic()
        if self._bar is not None:
            # The bar stays on screen as the epoch's training summary; the log line below has the rest.
            self._bar.set_postfix_str(self._training_postfix, refresh=False)
        self._close_bar()
        self._reporter = None
        self._in_epoch = False
        training_end = self._validation_started or ended
        training_seconds = training_end - self._started
        images_per_second = self._steps_done * self.batch_size / training_seconds if training_seconds > 0 else 0.0
        validation = f", validation {ended - training_end:.0f} s" if self._validation_started else ""
        named = in_reading_order(epoch_metrics(logs or {}))
        metrics = ", ".join(f"{name} {value:.4f}" for name, value in named.items())
        self._epoch_seconds.append(ended - self._started)
        eta = self._run_eta(ended)
        logger.info(
            "%s done in %.0f s (training %.0f s at %.1f images/s%s): %s%s",
            self._label(epoch),
            ended - self._started,
            training_seconds,
            images_per_second,
            validation,
            metrics or "no metrics",
            f"; {eta}" if eta and epoch + 1 < (self.params or {}).get("epochs", 0) else "",
        )

    def on_train_end(self, logs=None):
        self._close_bar()

    def _close_bar(self):
        if self._bar is not None:
            self._bar.close()
            self._bar = None
