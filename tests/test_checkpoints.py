"""Checkpoints: each epoch's state is one checked set, a crash at any instant (kill -9 during the
write included) or a full disk costs at most the epoch in progress, and the rerun resumes
bit-identically in the same MLflow run, without anything deleted by hand."""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import keras
import mlflow
import numpy as np
import pytest
from helpers import write_params

from alexnet8 import checkpoints
from alexnet8.checkpoints import (
    MANIFEST_FILE,
    RUN_RECORD_FILE,
    STATE_FILE,
    completed_epochs,
    latest_saved_epoch,
    recover_run_record,
    restore_state,
    save_epoch,
)
from alexnet8.errors import PipelineError


def _tiny_model() -> keras.Model:
    keras.utils.set_random_seed(1)
    model = keras.Sequential(
        [keras.Input((64,)), keras.layers.Dense(256), keras.layers.Dropout(0.5), keras.layers.Dense(2)]
    )
    model.compile(optimizer="adam", loss="mse")
    model.optimizer.build(model.trainable_variables)
    return model


def _train_a_step(model: keras.Model) -> None:
    """Changes the weights, the optimizer's state and the dropout layer's random state."""
    model.fit(np.ones((4, 64)), np.ones((4, 2)), epochs=1, verbose=0)


def _state(model: keras.Model) -> list[np.ndarray]:
    return [np.asarray(v).copy() for v in [*model.variables, *model.optimizer.variables]]


def _save(folder: Path, model: keras.Model, epoch: int) -> Path:
    history = folder / "history.csv"
    folder.mkdir(parents=True, exist_ok=True)
    history.write_text("epoch,loss\n" + "".join(f"{index},{1 / (index + 1)}\n" for index in range(epoch)))
    return save_epoch(folder, epoch, model, history)


def test_a_set_holds_all_an_epoch_left_and_restores_it_exactly(tmp_path):
    model = _tiny_model()
    _train_a_step(model)
    (tmp_path / RUN_RECORD_FILE).write_text('{"run_id": "abc"}')
    saved = _state(model)
    path = _save(tmp_path, model, 1)
    assert sorted(p.name for p in path.iterdir()) == sorted([STATE_FILE, "history.csv", RUN_RECORD_FILE, MANIFEST_FILE])
    _train_a_step(model)
    assert not all(np.array_equal(a, b) for a, b in zip(saved, _state(model), strict=True))

    resumed = latest_saved_epoch(tmp_path, model, writer=True)
    assert (resumed.path, resumed.epoch, resumed.history) == (path, 1, "epoch,loss\n0,1.0\n")
    restore_state(model, resumed)
    assert all(np.array_equal(a, b) for a, b in zip(saved, _state(model), strict=True))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch-1", "history.csv", RUN_RECORD_FILE]


def test_the_newest_two_sets_are_kept(tmp_path):
    model = _tiny_model()
    for epoch in range(1, 5):
        _save(tmp_path, model, epoch)
    assert sorted(p.name for p in tmp_path.glob("*epoch*")) == ["epoch-3", "epoch-4"]
    assert completed_epochs(tmp_path) == 4


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _overwrite_the_middle(path: Path) -> None:
    content = bytearray(path.read_bytes())
    content[len(content) // 2 : len(content) // 2 + 100] = bytes(100)
    path.write_bytes(bytes(content))


DAMAGES = {
    "state cut short": lambda s: _truncate(s / STATE_FILE),
    "state overwritten, same size": lambda s: _overwrite_the_middle(s / STATE_FILE),
    "history missing": lambda s: (s / "history.csv").unlink(),
    "manifest cut short": lambda s: _truncate(s / MANIFEST_FILE),
    "manifest empty": lambda s: (s / MANIFEST_FILE).write_text(""),
}


@pytest.mark.parametrize("damage", DAMAGES.values(), ids=DAMAGES.keys())
def test_a_damaged_set_is_named_set_aside_and_the_one_before_it_resumed(tmp_path, caplog, damage):
    model = _tiny_model()
    _save(tmp_path, model, 1)
    first = _state(model)
    _train_a_step(model)
    newest = _save(tmp_path, model, 2)
    damage(newest)

    assert completed_epochs(tmp_path) == 1  # a reader changes nothing
    assert newest.exists()
    caplog.set_level(logging.WARNING, logger="alexnet8.checkpoints")
    resumed = latest_saved_epoch(tmp_path, model, writer=True)
    assert resumed.epoch == 1
    restore_state(model, resumed)
    assert all(np.array_equal(a, b) for a, b in zip(first, _state(model), strict=True))
    assert not newest.exists() and (tmp_path / "damaged-epoch-2").is_dir()  # kept, to look into
    assert f"{newest} cannot be resumed from (" in caplog.text and "set aside as" in caplog.text
    _train_a_step(model)
    _save(tmp_path, model, 2)  # the training goes on
    assert completed_epochs(tmp_path) == 2


def test_a_set_that_does_not_fit_the_model_is_set_aside(tmp_path):
    _save(tmp_path, _tiny_model(), 1)
    other = keras.Sequential([keras.Input((64,)), keras.layers.Dense(3)])
    other.compile(optimizer="adam", loss="mse")
    other.optimizer.build(other.trainable_variables)
    assert latest_saved_epoch(tmp_path, other, writer=True) is None
    assert (tmp_path / "damaged-epoch-1").is_dir()


def test_what_an_interrupted_write_left_is_removed_and_never_resumed(tmp_path):
    model = _tiny_model()
    _save(tmp_path, model, 1)
    for unfinished in (".epoch-2.tmp", ".epoch-0.old"):
        (tmp_path / unfinished).mkdir()
        (tmp_path / unfinished / STATE_FILE).write_bytes(b"PK\x03\x04 half")
    assert latest_saved_epoch(tmp_path, model, writer=True).epoch == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch-1", "history.csv"]


@pytest.mark.parametrize("damage", ["{", '{"run_id": null}', ""])
def test_a_damaged_run_record_is_set_aside_and_restored_from_the_newest_set(tmp_path, caplog, damage):
    caplog.set_level(logging.WARNING, logger="alexnet8.checkpoints")
    record = tmp_path / RUN_RECORD_FILE
    record.write_text('{"run_id": "abc"}')
    _save(tmp_path, _tiny_model(), 1)
    record.write_text(damage)
    recover_run_record(tmp_path)
    assert record.read_text() == '{"run_id": "abc"}'
    assert (tmp_path / f"damaged-{RUN_RECORD_FILE}").read_text() == damage
    assert f"{record} is damaged" in caplog.text


def _mount_tmpfs(folder: Path, size: str) -> Path:
    """`folder` on a new file system of `size` (a tmpfs), to fill; the test is skipped where
    mounting is not allowed (it needs root)."""
    folder.mkdir()
    try:
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True
        )
    except FileNotFoundError:
        pytest.skip("no mount command here: a full disk needs a small file system to fill")
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()}): a full disk needs one")
    return folder


@pytest.fixture
def small_disk(tmp_path):
    """A folder on a real 8 MB file system."""
    yield _mount_tmpfs(tmp_path / "disk", "8m")
    subprocess.run(["umount", str(tmp_path / "disk")], check=True)


def _fill(folder: Path, leave: int) -> Path:
    """Write a file that leaves `leave` bytes free on `folder`'s file system."""
    filler = folder / "filler"
    filler.write_bytes(bytes(max(0, shutil.disk_usage(folder).free - leave)))
    return filler


@pytest.mark.parametrize("found", ["before writing", "while writing"])
def test_a_full_disk_names_the_folder_and_the_space_needed_and_leaves_the_last_set(small_disk, monkeypatch, found):
    folder = small_disk / "checkpoints"
    model = _tiny_model()
    _save(folder, model, 1)
    filler = _fill(small_disk, leave=(folder / "epoch-1" / STATE_FILE).stat().st_size // 2)
    if found == "while writing":  # the file system's own ENOSPC, half-way through the state
        monkeypatch.setattr(checkpoints, "_check_space", lambda folder, needed: None)
    _train_a_step(model)
    with pytest.raises(
        PipelineError,
        match=rf"^no space left on the device of {folder}: the checkpoint of epoch 2 needs [\d.]+ MB "
        r"\([\d.]+ MB free now\)\. Free some space and rerun: training resumes after epoch 1$",
    ):
        _save(folder, model, 2)
    assert sorted(p.name for p in folder.iterdir()) == ["epoch-1", "history.csv"]  # nothing half-written
    filler.unlink()
    _save(folder, model, 2)
    assert completed_epochs(folder) == 2


# The train stage, as `python -m alexnet8 train ARGUMENTS` runs it, which at one point of one
# epoch's end kills itself with SIGKILL (or SIGTERM, as Ctrl-C), or fills its disk:
# `python -c CRASHING_TRAIN POINT EPOCH ARGUMENTS...`.
CRASHING_TRAIN = r"""
import os, shutil, signal, sys
from pathlib import Path
from alexnet8 import checkpoints
from alexnet8.__main__ import main

point, at_epoch, arguments = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
signal_number = signal.SIGTERM if point.endswith("+sigterm") else signal.SIGKILL
point = point.removesuffix("+sigterm")
epoch = 0

def crash(here):
    if here == point and epoch == at_epoch:
        os.kill(os.getpid(), signal_number)

def save_epoch(original, folder, index, *rest):
    global epoch
    epoch = index
    crash("before-set")
    saved = original(folder, index, *rest)
    crash("after-set")
    if point == "fill-disk" and epoch == at_epoch:
        Path(folder).parent.parent.joinpath("filler").write_bytes(bytes(shutil.disk_usage(folder).free - 2**19))
    return saved

def write_durably(original, path, data):
    if point == f"half-{path.name}" and epoch == at_epoch:
        with open(path, "wb") as stream:
            stream.write(bytes(data[: len(data) // 2]))
            stream.flush()
            os.fsync(stream.fileno())
        crash(point)
    crash(f"before-{path.name}")
    original(path, data)

def fsync_directory(original, path):
    original(path)
    crash("before-rename" if path.name.startswith(".") else "after-rename")

def discard(original, path):
    if point == "dropping-older" and epoch == at_epoch:
        path.rename(path.with_name(f".{path.name}.old"))
        crash(point)
    original(path)

for name, replacement in [("save_epoch", save_epoch), ("_write_durably", write_durably),
                          ("_fsync_directory", fsync_directory), ("_discard", discard)]:
    setattr(checkpoints, name, lambda *args, r=replacement, o=getattr(checkpoints, name): r(o, *args))
main(["train", *arguments])
"""

EPOCHS = 5
EPOCH_NUMBERS = list(range(1, EPOCHS + 1))  # as MLflow steps and the history CSV number them
# No XLA: compiling the train step costs each of the chain's dozen processes seconds, and what is
# tested here is the checkpoint format, not the arithmetic (test_optimization.py compiles it).
TINY = {"train.epochs": EPOCHS, "train.batch_size": 16, "train.dense_units": 32, "train.jit_compile": False}


def _arguments(folder: Path, prepared_dir: Path, params_file: Path, checkpoints_folder: Path | None = None):
    outputs = {"model": "model.keras", "history": "history.csv", "metrics": "train.json", "run-file": "run.json"}
    return [
        *("--params", str(params_file), "--data", str(prepared_dir)),
        *(part for option, name in outputs.items() for part in (f"--{option}", str(folder / name))),
        *("--checkpoints", str(checkpoints_folder or folder / "checkpoints")),
    ]


def _run(arguments: list[str], crash: tuple[str, int] | None = None, environment=None) -> tuple[int, str]:
    prefix = ["-c", CRASHING_TRAIN, crash[0], str(crash[1])] if crash else ["-m", "alexnet8", "train"]
    result = subprocess.run(
        [sys.executable, *prefix, *arguments],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=environment,
        timeout=600,
    )
    return result.returncode, result.stdout


def _resumed_after(output: str) -> int:
    found = re.search(r"resuming from \S+ after epoch (\d+) of", output)
    return int(found[1]) if found else 0


@pytest.fixture(scope="module")
def uninterrupted(prepared_dir, tmp_path_factory):
    """The final weights of the train stage at TINY params, run without interruption."""
    from alexnet8.evaluate import load_trained_model

    folder = tmp_path_factory.mktemp("uninterrupted")
    params_file = write_params(folder / "params.yaml", **TINY)
    environment = os.environ | {"MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}"}
    returncode, output = _run(_arguments(folder, prepared_dir, params_file), environment=environment)
    assert returncode == 0, output
    return load_trained_model(folder / "model.keras").get_weights()


def _damage_the_run_record(checkpoint: Path) -> None:
    (checkpoint / RUN_RECORD_FILE).write_text('{"run_id": ')


def _damage_the_newest_state(checkpoint: Path) -> None:
    _overwrite_the_middle(max(checkpoint.glob("epoch-*")) / STATE_FILE)


# Where each run of the chain is killed (the point, in which epoch's end), what is then damaged
# by hand, and the epoch after which the next run resumes: never earlier than the last epoch
# whose set was complete, so at most the epoch in progress is lost.
KILLS = [
    ("before-set", 1, None, 0),  # the history row is written, its set not yet
    ("half-state.npz", 1, None, 0),  # a torn file
    ("after-rename", 1, None, 1),
    ("before-manifest.json", 2, None, 1),
    ("half-manifest.json", 2, None, 1),
    ("before-rename", 2, None, 1),
    ("dropping-older", 3, None, 2),  # epoch-1 half deleted while epoch-3 is written
    ("after-set", 3, _damage_the_run_record, 3),  # before MLflow is told of the epoch
    ("half-state.npz+sigterm", 4, None, 3),  # Ctrl-C while the state is written
    ("after-rename", 4, _damage_the_newest_state, 3),
    ("after-set", 4, None, 4),
]


@pytest.mark.slow
def test_a_train_stage_killed_at_any_point_of_an_epochs_end_resumes_bit_identically(
    prepared_dir, tmp_path, uninterrupted
):
    from alexnet8.evaluate import load_trained_model

    arguments = _arguments(tmp_path, prepared_dir, write_params(tmp_path / "params.yaml", **TINY))
    resumes_after = 0
    for point, epoch, damage, then_resumes_after in KILLS:
        returncode, output = _run(arguments, crash=(point, epoch))
        assert returncode == (130 if point.endswith("+sigterm") else -9), f"{point}, epoch {epoch}:\n{output}"
        assert _resumed_after(output) == resumes_after, f"{point}, epoch {epoch}:\n{output}"
        [checkpoint] = (tmp_path / "checkpoints").iterdir()
        if damage:
            damage(checkpoint)
        resumes_after = then_resumes_after
    assert (checkpoint / "damaged-epoch-4").is_dir() and (checkpoint / f"damaged-{RUN_RECORD_FILE}").exists()

    returncode, output = _run(arguments)
    assert returncode == 0 and _resumed_after(output) == resumes_after, output
    client = mlflow.MlflowClient()
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED"  # one run, continued by every rerun
    for metric in ("train/loss", "val/accuracy"):
        assert [point.step for point in client.get_metric_history(run.info.run_id, metric)] == EPOCH_NUMBERS
    assert len((tmp_path / "history.csv").read_text().splitlines()) == 1 + EPOCHS
    weights = load_trained_model(tmp_path / "model.keras").get_weights()
    assert all(np.array_equal(a, b) for a, b in zip(uninterrupted, weights, strict=True))
    assert not any((tmp_path / "checkpoints").iterdir())


@pytest.fixture
def disk_for_training(tmp_path):
    """A folder on a real 256 MB file system, room for a few checkpoint sets of the TINY model."""
    yield _mount_tmpfs(tmp_path / "disk", "256m")
    subprocess.run(["umount", str(tmp_path / "disk")], check=True)


@pytest.mark.slow
def test_a_disk_that_fills_during_training_fails_the_run_clearly_and_the_rerun_resumes(
    prepared_dir, tmp_path, disk_for_training, uninterrupted
):
    from alexnet8.evaluate import load_trained_model

    params_file = write_params(tmp_path / "params.yaml", **TINY)
    arguments = _arguments(tmp_path, prepared_dir, params_file, disk_for_training / "checkpoints")
    returncode, output = _run(arguments, crash=("fill-disk", 1))  # the disk is full after epoch 1's set
    [checkpoint] = (disk_for_training / "checkpoints").iterdir()
    assert returncode == 1, output
    assert re.search(
        rf"ERROR .*: no space left on the device of {checkpoint}: the checkpoint of epoch 2 needs [\d.]+ MB "
        r"\([\d.]+ MB free now\)\. Free some space and rerun: training resumes after epoch 1\n",
        output,
    ), output
    assert "Traceback" not in output
    client = mlflow.MlflowClient()
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FAILED"
    assert sorted(p.name for p in checkpoint.iterdir()) == ["epoch-1", "history.csv", RUN_RECORD_FILE]

    (disk_for_training / "filler").unlink()  # space is freed
    returncode, output = _run(arguments)
    assert returncode == 0 and _resumed_after(output) == 1, output
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED"
    assert [point.step for point in client.get_metric_history(run.info.run_id, "train/loss")] == EPOCH_NUMBERS
    weights = load_trained_model(tmp_path / "model.keras").get_weights()
    assert all(np.array_equal(a, b) for a, b in zip(uninterrupted, weights, strict=True))
