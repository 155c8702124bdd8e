"""Progress within an epoch and a loop: ~10 log lines without a terminal, a tqdm bar on one,
epochs numbered after a resume."""

from __future__ import annotations

import io
import logging
import os
import re
import select

import keras
import numpy as np
import pytest
from tqdm import tqdm

from alexnet8.epoch_progress import EpochProgress
from alexnet8.progress import TenthsLogger, logging_stream, progress_bar

PROGRESS_LINE = re.compile(
    r"^(?P<epoch>epoch \d+/\d+): (?P<done>\d+)/(?P<total>\d+) steps \((?P<percent>\d+)%\), "
    r"(?P<rate>[\d.]+) images/s, elapsed \d+:\d\d:\d\d, ETA \d+:\d\d:\d\d$"
)
EPOCH_LINE = re.compile(
    r"^(?P<epoch>epoch \d+/\d+) done in \d+ s \(training \d+ s at [\d.]+ images/s, validation \d+ s\): "
    r"(?P<metrics>.*)$"
)
STEPS, BATCH = 20, 4


class FakeTerminal(io.StringIO):
    """A stream that says it is a terminal, and keeps what was written to it."""

    def isatty(self):
        return True


def tiny_model() -> keras.Model:
    model = keras.Sequential([keras.Input(shape=(8,)), keras.layers.Dense(3, activation="softmax")])
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def fit_tiny(callbacks, epochs=1):
    random = np.random.default_rng(0)
    images, labels = random.normal(size=(STEPS * BATCH, 8)).astype("float32"), random.integers(0, 3, STEPS * BATCH)
    tiny_model().fit(
        images,
        labels,
        batch_size=BATCH,
        epochs=epochs,
        steps_per_epoch=STEPS,
        validation_data=(images[:8], labels[:8]),
        callbacks=callbacks,
        verbose=0,
    )


def progress_messages(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == "alexnet8.progress"]


def test_without_a_terminal_an_epoch_logs_ten_progress_lines_then_one_line_with_its_metrics(caplog):
    caplog.set_level(logging.INFO, logger="alexnet8.progress")
    fit_tiny([EpochProgress(STEPS, BATCH, stream=io.StringIO())], epochs=2)

    messages = progress_messages(caplog)
    for epoch in ("epoch 1/2", "epoch 2/2"):
        progress = [match for match in map(PROGRESS_LINE.match, messages) if match and match["epoch"] == epoch]
        percents = [int(match["percent"]) for match in progress]
        assert percents == list(range(10, 101, 10)), messages
        assert [int(match["done"]) for match in progress] == list(range(2, 21, 2))
        assert all(float(match["rate"]) > 0 for match in progress)
        ends = [match for match in map(EPOCH_LINE.match, messages) if match and match["epoch"] == epoch]
        assert len(ends) == 1, messages
        # verbose=2's metrics, in its order.
        assert re.fullmatch(
            r"train/loss [\d.]+, train/accuracy [\d.]+, val/loss [\d.]+, val/accuracy [\d.]+(; run ETA [\d:]+)?",
            ends[0]["metrics"],
        )
    # The epoch's line comes after its progress lines.
    assert EPOCH_LINE.match(messages[10]) and EPOCH_LINE.match(messages[-1])


def test_on_a_terminal_each_epoch_is_a_tqdm_bar_and_only_the_metrics_are_logged(caplog):
    caplog.set_level(logging.INFO, logger="alexnet8.progress")
    terminal = FakeTerminal()
    fit_tiny([EpochProgress(STEPS, BATCH, stream=terminal)], epochs=2)

    drawn = terminal.getvalue()
    assert "epoch 1/2" in drawn and "epoch 2/2" in drawn
    # Each bar ends showing the whole epoch's training, not the "validating" note it showed meanwhile.
    final_bars = re.findall(
        r"epoch \d/2: 100%\|[^|]*\| 20/20 steps \[[\d:]+<[\d:]+, [\d.]+ images/s, train/loss [\d.]+, "
        r"run ETA [\d:]+\] *\n",
        drawn,
    )
    assert len(final_bars) == 2, drawn
    assert "validating" in drawn
    messages = progress_messages(caplog)
    assert not any(PROGRESS_LINE.match(message) for message in messages)
    assert [EPOCH_LINE.match(message)["epoch"] for message in messages] == ["epoch 1/2", "epoch 2/2"]


def test_the_bar_goes_to_the_stream_logging_writes_to_when_it_is_a_terminal(monkeypatch, caplog):
    terminal = FakeTerminal()
    handler = logging.StreamHandler(terminal)
    monkeypatch.setattr(logging.getLogger("alexnet8"), "handlers", [handler])
    assert logging_stream() is terminal

    caplog.set_level(logging.INFO, logger="alexnet8.progress")
    fit_tiny([EpochProgress(STEPS, BATCH)])  # no stream given: the logging stream
    assert "20/20 steps" in terminal.getvalue()


def test_a_run_resumed_by_backup_and_restore_numbers_its_epochs_from_the_resumed_one(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="alexnet8.progress")
    backup = str(tmp_path / "backup")
    fit_tiny([keras.callbacks.BackupAndRestore(backup, delete_checkpoint=False)], epochs=2)  # then the process dies

    resumed = [
        keras.callbacks.BackupAndRestore(backup, delete_checkpoint=False),
        EpochProgress(STEPS, BATCH, stream=io.StringIO()),
    ]
    fit_tiny(resumed, epochs=4)
    epochs = {match["epoch"] for match in map(PROGRESS_LINE.match, progress_messages(caplog)) if match}
    assert epochs == {"epoch 3/4", "epoch 4/4"}
    assert [
        EPOCH_LINE.match(message)["epoch"] for message in progress_messages(caplog) if EPOCH_LINE.match(message)
    ] == ["epoch 3/4", "epoch 4/4"]


def test_rate_elapsed_and_eta_are_the_average_since_the_start(caplog):
    caplog.set_level(logging.INFO, logger="alexnet8.progress")
    ticks = iter(range(100))
    reporter = TenthsLogger(
        20, "epoch 1/5", "steps", rate_unit="images", rate_scale=32, clock=lambda: float(next(ticks))
    )
    reporter.update_to(1)  # below 10%: the clock is not even read
    reporter.update_to(2)  # read at tick 1: 2 steps of 32 images in 1 s
    assert progress_messages(caplog) == ["epoch 1/5: 2/20 steps (10%), 64.0 images/s, elapsed 0:00:01, ETA 0:00:09"]


@pytest.mark.parametrize(("total", "step", "expected_lines"), [(6, 1, 6), (10_000, 500, 10), (1407, 1, 10)])
def test_a_plain_loop_without_a_terminal_logs_about_every_tenth(caplog, total, step, expected_lines):
    caplog.set_level(logging.INFO, logger="alexnet8.progress")
    with progress_bar(total, "predicting the test split", "images", stream=io.StringIO()) as progress:
        for start in range(0, total, step):
            progress.update(min(step, total - start))
    messages = progress_messages(caplog)
    assert len(messages) == expected_lines
    assert messages[-1].startswith(f"predicting the test split: {total}/{total} images (100%), ")
    percents = [int(re.search(r"\((\d+)%\)", message)[1]) for message in messages]
    assert percents == sorted(set(percents))


def test_a_plain_loop_on_a_terminal_gets_a_tqdm_bar(caplog):
    caplog.set_level(logging.INFO, logger="alexnet8.progress")
    terminal = FakeTerminal()
    with progress_bar(6, "reading batch files", "files", stream=terminal) as progress:
        assert isinstance(progress, tqdm)
        for _ in range(6):
            progress.update()
    assert re.search(
        r"reading batch files: 100%\|[^|]*\| 6/6 files \[[\d:]+<[\d:]+, [\d.]+ files/s\]", terminal.getvalue()
    )
    assert progress_messages(caplog) == []


def test_a_terminal_that_reports_no_size_still_gets_a_visible_bar():
    # A new pseudo-terminal is 0 x 0, like `script` run without a terminal around it (CI).
    controller, terminal_end = os.openpty()
    with open(terminal_end, "w", encoding="utf-8") as terminal, open(controller, "rb", buffering=0) as screen:
        assert terminal.isatty() and os.get_terminal_size(terminal.fileno()).columns == 0
        with progress_bar(6, "reading batch files", "files", stream=terminal) as progress:
            progress.update(6)
        terminal.flush()
        drawn = b""
        while select.select([screen], [], [], 0.5)[0]:  # all the bar wrote, however it was chunked
            drawn += screen.read(65536)
        drawn = drawn.decode()
    assert re.search(r"reading batch files: 100%\|█+\| 6/6 files", drawn), drawn


class NarrowTerminal(FakeTerminal):
    """A terminal with a file descriptor, whose size the test sets to 80 columns."""

    def fileno(self):
        return 1


def test_at_80_columns_the_bar_stays_readable_and_shows_the_whole_runs_eta(monkeypatch):
    monkeypatch.setattr("alexnet8.progress.os.get_terminal_size", lambda fd: os.terminal_size((80, 24)))
    monkeypatch.setenv("COLUMNS", "80")
    terminal = NarrowTerminal()
    fit_tiny([EpochProgress(STEPS, BATCH, stream=terminal)], epochs=2)
    frames = [frame for frame in re.split(r"[\r\n]", terminal.getvalue()) if "epoch 1/2" in frame]
    last = frames[-1].rstrip()
    assert len(last) <= 80 and "run ETA" in last, frames
    bar = re.search(r"\|([^|]*)\|", last)[1]
    assert len(bar) >= 10, last  # the bar itself, not squeezed to a character
