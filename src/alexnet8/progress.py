"""Progress inside long loops: a live bar on a terminal, a log line about every tenth of the way otherwise.

Reads nothing. Writes to the stream the project's logging writes to (standard error under
`cli.run`'s `logging.basicConfig`): when that stream is a terminal, a tqdm bar with the rate and
the time left; when it is not (CI, `dvc repro > log 2>&1`, the `dvc queue` worker, whose output
goes to a log file), records of the logger `alexnet8.progress` at about every 10% of the loop:
done/total, percent, rate, elapsed time and ETA. Nothing is written to any file.

- EpochProgress: a Keras callback for `model.fit(..., verbose=0)`: the above within each epoch,
  then one line per epoch with its seconds and metrics (what verbose=2 printed).
- progress_bar: the same for a plain loop (reading batch files, predicting in batches).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Protocol, TextIO

import keras
from tqdm import tqdm

logger = logging.getLogger(__name__)

# tqdm's default line, with the unit after the counts and the rate always as units per second
# (tqdm flips slow rates to seconds per unit, which reads badly next to the log lines).
_BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt}{unit} [{elapsed}<{remaining}, {rate_noinv_fmt}{postfix}]"
# The epoch bar's rate is in images, computed by the callback and shown as its postfix.
_EPOCH_BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt}{unit} [{elapsed}<{remaining}{postfix}]"


class Progress(Protocol):
    """What progress_bar yields: tqdm on a terminal, TenthsLogger otherwise."""

    def update(self, n: float = 1) -> object: ...


def logging_stream() -> TextIO:
    """The stream this module's records end up on: the first stream handler from here up to the root logger.

    Without any handler, logging's last resort writes to standard error, and so does this.
    """
    current: logging.Logger | None = logger
    while current is not None:
        for handler in current.handlers:
            if isinstance(handler, logging.StreamHandler):
                return handler.stream
        current = current.parent if current.propagate else None
    return sys.stderr


def is_terminal(stream: TextIO) -> bool:
    """Whether `stream` is an open terminal (a closed or fake stream is not)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def bar_width_options(stream: TextIO) -> dict[str, object]:
    """tqdm's size arguments for `stream`: follow the terminal's width, or 120 columns when it reports none.

    A pseudo-terminal without a size (`script` run by CI, some container runtimes) reports 0 x 0,
    which tqdm would take literally and draw nothing; given both sizes, it does not ask.
    """
    try:
        columns = os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):  # no file descriptor (io.UnsupportedOperation is an OSError)
        columns = 0
    return {"dynamic_ncols": True} if columns > 0 else {"ncols": 120, "nrows": 24}


def format_duration(seconds: float) -> str:
    """H:MM:SS, rounded to the second."""
    return str(datetime.timedelta(seconds=round(max(seconds, 0))))


def in_reading_order(metrics: dict[str, object]) -> dict[str, object]:
    """`metrics` with loss first, then the other training metrics, then the same for validation (`val_`).

    Keras hands callbacks its logs sorted by name, which puts accuracy before loss and val_accuracy
    before val_loss; the loss is what one looks at first.
    """
    return dict(
        sorted(metrics.items(), key=lambda item: (item[0].startswith("val_"), item[0].removeprefix("val_") != "loss"))
    )


class TenthsLogger:
    """Logs `description: done/total unit (p%), rate, elapsed, ETA` each time a tenth of `total` is passed.

    For streams that are not terminals: about ten lines per loop, whatever its length (one per
    update when `total` is 10 or less). The rate counts `rate_scale` `rate_unit` per unit done,
    so an epoch counted in steps can report images/s; it is the average since construction.
    """

    def __init__(
        self,
        total: int,
        description: str,
        unit: str,
        rate_unit: str | None = None,
        rate_scale: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        if total < 1:
            raise ValueError(f"total must be at least 1, got {total}")
        self.total = total
        self.description = description
        self.unit = unit
        self.rate_unit = rate_unit or unit
        self.rate_scale = rate_scale
        self.clock = clock
        self.started = clock()
        self.n = 0
        self._next_tenth = 1

    def _count_for_tenth(self, tenth: int) -> int:
        return math.ceil(self.total * tenth / 10)

    def update(self, n: float = 1) -> None:
        self.update_to(self.n + n)

    def update_to(self, done: float) -> None:
        """Set the count done; logs if it passed the next tenth (cheap otherwise: one comparison)."""
        self.n = done
        if self._next_tenth > 10 or done < self._count_for_tenth(self._next_tenth):
            return
        while self._next_tenth <= 10 and done >= self._count_for_tenth(self._next_tenth):
            self._next_tenth += 1
        elapsed = self.clock() - self.started
        rate = done * self.rate_scale / elapsed if elapsed > 0 else float("inf")
        eta = (self.total - done) * elapsed / done if done else float("inf")
        logger.info(
            "%s: %d/%d %s (%d%%), %.1f %s/s, elapsed %s, ETA %s",
            self.description,
            done,
            self.total,
            self.unit,
            100 * done // self.total,
            rate,
            self.rate_unit,
            format_duration(elapsed),
            format_duration(eta) if math.isfinite(eta) else "?",
        )


@contextlib.contextmanager
def progress_bar(
    total: int, description: str, unit: str = "items", stream: TextIO | None = None, terminal: bool | None = None
) -> Iterator[Progress]:
    """Progress of a loop of `total` units: call `.update(n)` after each piece of work.

    On a terminal (`stream`, by default the logging stream; `terminal` overrides the check) a
    tqdm bar that stays on screen when done; otherwise a TenthsLogger. Either way `.update(n)`
    adds n units done.
    """
    stream = logging_stream() if stream is None else stream
    if is_terminal(stream) if terminal is None else terminal:
        bar = tqdm(
            total=total,
            desc=description,
            unit=f" {unit}",
            file=stream,
            bar_format=_BAR_FORMAT,
            smoothing=0,
            **bar_width_options(stream),
        )
        with bar:
            yield bar
    else:
        yield TenthsLogger(total, description, unit)


class EpochProgress(keras.callbacks.Callback):
    """Progress within each epoch of `model.fit(..., verbose=0)`, and each epoch's metrics when it ends.

    On a terminal, a tqdm bar per epoch: steps, images/s, time left, running loss and accuracy.
    Otherwise a log line about every 10% of the epoch: `epoch k/n: s/S steps (p%), r images/s,
    elapsed, ETA`. Both end each epoch with the same log line: seconds of training and of
    validation, images/s, and the epoch's metrics (loss, accuracy, val_loss, val_accuracy).

    `steps_per_epoch` and `batch_size` are what fit is given (fit only knows the steps of an
    endless dataset when told them). Epochs are numbered from the index fit passes to
    `on_epoch_begin`, so a run resumed by BackupAndRestore at epoch 3 shows `epoch 3/5`.

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

    def on_epoch_begin(self, epoch, logs=None):
        self._close_bar()
        self._in_epoch = True
        self._steps_done = 0
        self._training_postfix = ""
        self._validation_started: float | None = None
        label = self._label(epoch)
        self._started = time.monotonic()
        if self._bar_mode:
            stream = logging_stream() if self.stream is None else self.stream
            self._bar = tqdm(
                total=self.steps_per_epoch,
                desc=label,
                unit=" steps",
                file=stream,
                bar_format=_EPOCH_BAR_FORMAT,
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
            elapsed = time.monotonic() - self._started
            images_per_second = self._steps_done * self.batch_size / elapsed if elapsed > 0 else 0.0
            logs = logs or {}
            metrics = "".join(
                f", {name} {logs[name]:.4f}" for name in ("loss", "accuracy") if isinstance(logs.get(name), float)
            )
            self._training_postfix = f"{images_per_second:.1f} images/s{metrics}"
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
        metrics = ", ".join(
            f"{name} {value:.4f}"
            for name, value in in_reading_order(logs or {}).items()
            if isinstance(value, (int, float))
        )
        logger.info(
            "%s done in %.0f s (training %.0f s at %.1f images/s%s): %s",
            self._label(epoch),
            ended - self._started,
            training_seconds,
            images_per_second,
            validation,
            metrics or "no metrics",
        )

    def on_train_end(self, logs=None):
        self._close_bar()

    def _close_bar(self):
        if self._bar is not None:
            self._bar.close()
            self._bar = None
