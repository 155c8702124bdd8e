"""Progress inside long loops: a live bar on a terminal, a log line about every tenth of the way otherwise.

Reads nothing. Writes to the stream the project's logging writes to (standard error under
`cli.run`'s `logging.basicConfig`): when that stream is a terminal, a tqdm bar with the rate and
the time left; when it is not (CI, `dvc repro > log 2>&1`, the `dvc queue` worker, whose output
goes to a log file), records of the logger `alexnet8.progress` at about every 10% of the loop:
done/total, percent, rate, elapsed time and ETA. Nothing is written to any file.

- progress_bar: for a plain loop (a download, predicting in batches).
- epoch_progress.EpochProgress: the same within each epoch of Keras' `fit`.
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

from tqdm import tqdm

logger = logging.getLogger(__name__)

# tqdm's default line, with the unit after the counts and the rate always as units per second
# (tqdm flips slow rates to seconds per unit, which reads badly next to the log lines).
_BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt}{unit} [{elapsed}<{remaining}, {rate_noinv_fmt}{postfix}]"


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


def terminal_columns(stream: TextIO) -> int:
    """The width of the terminal behind `stream`, or 0 when it reports none."""
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):  # no file descriptor (io.UnsupportedOperation is an OSError)
        return 0


def bar_width_options(stream: TextIO) -> dict[str, object]:
    """tqdm's size arguments for `stream`: follow the terminal's width, or 120 columns when it reports none.

    A pseudo-terminal without a size (`script` run by CI, some container runtimes) reports 0 x 0,
    which tqdm would take literally and draw nothing; given both sizes, it does not ask.
    """
    return {"dynamic_ncols": True} if terminal_columns(stream) > 0 else {"ncols": 120, "nrows": 24}


def format_duration(seconds: float) -> str:
    """H:MM:SS, rounded to the second."""
    return str(datetime.timedelta(seconds=round(max(seconds, 0))))


def in_reading_order(metrics: dict[str, object]) -> dict[str, object]:
    """`metrics` (named `<group>/<measure>`) with training first, the loss before the other
    measures of each group: the loss is what one looks at first."""
    return dict(sorted(metrics.items(), key=lambda item: (item[0].startswith("val"), not item[0].endswith("/loss"))))


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
    total: int,
    description: str,
    unit: str = "items",
    stream: TextIO | None = None,
    terminal: bool | None = None,
    rate_unit: str | None = None,
    rate_scale: float = 1.0,
) -> Iterator[Progress]:
    """Progress of a loop of `total` units: call `.update(n)` after each piece of work.

    On a terminal (`stream`, by default the logging stream; `terminal` overrides the check) a
    tqdm bar that stays on screen when done; otherwise a TenthsLogger, whose rate counts
    `rate_scale` `rate_unit` per unit (bytes counted, MB/s shown). Either way `.update(n)` adds n
    units done.
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
        yield TenthsLogger(total, description, unit, rate_unit=rate_unit, rate_scale=rate_scale)
