"""The state of an interrupted training, kept so that a crash at any instant costs at most the
epoch in progress and the resumed training ends bit-identical to an uninterrupted one.

Reads and writes `<checkpoints>/<key>/`, this training's checkpoint folder. `<key>` is a digest of
everything the state depends on, so a checkpoint made with other params or data is never resumed.
The folder holds:

- `epoch-<n>/`, the set of all that epoch n (counted from 1) left: `state.npz` (the model's
  variables, the dropout layers' random state included, and the optimizer's), `history.csv` (the
  metrics of epochs 1 to n), `mlflow_run.json` (the MLflow run being continued) and
  `manifest.json` (the epoch, and each file's size and sha256). A set is written into a
  temporary `.epoch-<n>.tmp/`, fsynced and renamed into place: a crash leaves the whole set or
  none of it. The newest two are kept; the older one is dropped only while a new one is written.
- `history.csv`, the live history the training appends to (reset from the resumed set), and
  `mlflow_run.json`, the MLflow run of this training (written by tracking.start_pipeline_run).
- `damaged-*`: a set (or run record) that failed its check, set aside with a warning naming it.
  Training resumes from the newest set that passes, in the same MLflow run.

Only the chief of a multi-worker training writes here; the other workers only read.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import logging
import os
import re
import shutil
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from alexnet8.dataset import DatasetDescription
from alexnet8.errors import PipelineError
from alexnet8.files import atomic_path
from alexnet8.metric_names import epoch_metrics
from alexnet8.params import Params
from alexnet8.reports import append_history_row
from alexnet8.run_record import run_record_problem

logger = logging.getLogger(__name__)

HISTORY_FILE = "history.csv"
RUN_RECORD_FILE = "mlflow_run.json"
STATE_FILE = "state.npz"
MANIFEST_FILE = "manifest.json"
_SET_FILES = {STATE_FILE, HISTORY_FILE, RUN_RECORD_FILE}  # besides the manifest
SETS_KEPT = 2  # the newest, and the one before it in case the newest is found damaged
_SET_NAME = re.compile(r"epoch-(\d+)")
_UNFINISHED_NAME = re.compile(r"\.epoch-\d+\.(tmp|old)")  # a set being written, or being deleted
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class DamagedSet(Exception):
    """A checkpoint set that fails its check; the message says which file and how."""


@dataclass(frozen=True)
class SavedEpoch:
    """A checked checkpoint set: where it is, the epochs done, the state and the history CSV."""

    path: Path
    epoch: int
    state: dict[str, np.ndarray]
    history: str


def _state_variables(model: keras.Model) -> dict[str, keras.Variable]:
    # model.variables holds the dropout layers' SeedGenerator states too (model.weights does
    # not); both lists come in the same order for the same model code.
    return {f"model.{i}": v for i, v in enumerate(model.variables)} | {
        f"optimizer.{i}": v for i, v in enumerate(model.optimizer.variables)
    }


def _sets(checkpoint_dir: Path) -> list[tuple[int, Path]]:
    """The sets in `checkpoint_dir`, newest first."""
    found = [(int(m[1]), path) for path in _entries(checkpoint_dir) if (m := _SET_NAME.fullmatch(path.name))]
    return sorted(found, reverse=True)


def _entries(folder: Path) -> list[Path]:
    return list(folder.iterdir()) if folder.is_dir() else []


def _checked_files(path: Path) -> tuple[int, dict[str, bytes]]:
    """The epoch a set's manifest names and the files it lists, each checked against its size and
    sha256. Raises DamagedSet."""
    try:
        manifest = json.loads((path / MANIFEST_FILE).read_text(encoding="utf-8"))
        epoch = int(manifest["epoch"])
        listed = {name: (int(file["bytes"]), str(file["sha256"])) for name, file in manifest["files"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise DamagedSet(f"{MANIFEST_FILE}: {type(error).__name__}: {error}") from None
    if f"epoch-{epoch}" != path.name or set(listed) - _SET_FILES or {STATE_FILE, HISTORY_FILE} - set(listed):
        raise DamagedSet(f"{MANIFEST_FILE} does not describe this set")
    contents = {}
    for name, (size, sha256) in listed.items():
        try:
            data = (path / name).read_bytes()
        except OSError as error:
            raise DamagedSet(f"{name}: {error.strerror or error}") from None
        if len(data) != size or hashlib.sha256(data).hexdigest() != sha256:
            raise DamagedSet(f"{name}: {len(data)} bytes whose sha256 differs from the manifest's")
        contents[name] = data
    return epoch, contents


def _read_set(path: Path, variables: dict[str, keras.Variable] | None) -> SavedEpoch:
    """The set at `path`, checked, and checked to fit `variables` if given. Raises DamagedSet."""
    epoch, contents = _checked_files(path)
    try:
        with np.load(io.BytesIO(contents[STATE_FILE]), allow_pickle=False) as arrays:
            state = {name: arrays[name] for name in arrays.files}
        history = contents[HISTORY_FILE].decode("utf-8")
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise DamagedSet(f"unreadable: {error}") from None
    if len(history.splitlines()) != 1 + epoch:
        raise DamagedSet(f"{HISTORY_FILE} does not hold {epoch} epochs")
    if variables is not None:
        expected = {name: (tuple(v.shape), np.dtype(v.dtype)) for name, v in variables.items()}
        if expected != {name: (array.shape, array.dtype) for name, array in state.items()}:
            raise DamagedSet(f"{STATE_FILE} does not fit this model (saved by another version of the code?)")
    return SavedEpoch(path, epoch, state, history)


def _set_aside(path: Path) -> Path:
    """Rename `path` to `damaged-<name>` (numbered if taken), beside it."""
    aside = path.with_name(f"damaged-{path.name}")
    number = 1
    while aside.exists():
        number += 1
        aside = path.with_name(f"damaged-{path.name}.{number}")
    path.rename(aside)
    return aside


def _discard(path: Path) -> None:
    """Delete a folder so that a crash half-way leaves only a name that reads as unfinished."""
    hidden = path.with_name(f".{path.name}.old")
    shutil.rmtree(hidden, ignore_errors=True)
    path.rename(hidden)
    shutil.rmtree(hidden, ignore_errors=True)


def _remove_unfinished(checkpoint_dir: Path) -> None:
    for path in _entries(checkpoint_dir):
        if _UNFINISHED_NAME.fullmatch(path.name):
            logger.info("removing %s: an unfinished write of an interrupted training", path)
            shutil.rmtree(path, ignore_errors=True)


def latest_saved_epoch(
    checkpoint_dir: str | Path, model: keras.Model | None = None, writer: bool = False
) -> SavedEpoch | None:
    """The newest set in `checkpoint_dir` that passes its check (and fits `model`, if given), or
    None. Each set that fails is named in a warning; a `writer` (the chief) also sets it aside
    and removes what an interrupted write left, others change nothing."""
    checkpoint_dir = Path(checkpoint_dir)
    if writer:
        _remove_unfinished(checkpoint_dir)
    variables = _state_variables(model) if model is not None else None
    for _, path in _sets(checkpoint_dir):
        try:
            return _read_set(path, variables)
        except DamagedSet as damage:
            if writer:
                aside = _set_aside(path)
                logger.warning("%s cannot be resumed from (%s): set aside as %s", path, damage, aside)
            else:
                logger.warning("%s cannot be resumed from (%s)", path, damage)
    return None


def completed_epochs(checkpoint_dir: str | Path) -> int:
    """Epochs an interrupted training finished, by its newest undamaged set (0 if there is none)."""
    saved = latest_saved_epoch(checkpoint_dir)
    return saved.epoch if saved else 0


def restore_state(model: keras.Model, saved: SavedEpoch) -> None:
    """Put the saved variables (model, dropout random state, optimizer) back into `model`, whose
    optimizer is built; `saved` was checked to fit it."""
    for name, variable in _state_variables(model).items():
        variable.assign(saved.state[name])


def _write_durably(path: Path, data: bytes | memoryview) -> None:
    with open(path, "wb") as stream:
        stream.write(data)
        stream.flush()
        os.fsync(stream.fileno())


def _fsync_directory(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _set_files(checkpoint_dir: Path, epoch: int, model: keras.Model, history_path: Path) -> dict[str, bytes]:
    """The files of epoch `epoch`'s set, its manifest last."""
    buffer = io.BytesIO()
    np.savez(buffer, **{name: np.asarray(variable) for name, variable in _state_variables(model).items()})
    files = {STATE_FILE: buffer.getbuffer(), HISTORY_FILE: history_path.read_bytes()}
    if (checkpoint_dir / RUN_RECORD_FILE).exists():
        files[RUN_RECORD_FILE] = (checkpoint_dir / RUN_RECORD_FILE).read_bytes()
    manifest = {
        "epoch": epoch,
        "files": {
            name: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()} for name, data in files.items()
        },
    }
    return files | {MANIFEST_FILE: json.dumps(manifest, indent=2).encode()}


def save_epoch(checkpoint_dir: str | Path, epoch: int, model: keras.Model, history_path: Path) -> Path:
    """Write the set `epoch-<epoch>`: the state of `model` and its optimizer, the history CSV at
    `history_path` (holding `epoch` rows) and the MLflow run record. Raises PipelineError when the
    disk is full, naming the folder and the space needed; nothing half-written is left."""
    checkpoint_dir = Path(checkpoint_dir)
    files = _set_files(checkpoint_dir, epoch, model, history_path)
    for _, older in _sets(checkpoint_dir)[SETS_KEPT - 1 :]:
        _discard(older)  # room for the new set; the newest stays until the new one is complete
    final = checkpoint_dir / f"epoch-{epoch}"
    temporary = checkpoint_dir / f".{final.name}.tmp"
    shutil.rmtree(temporary, ignore_errors=True)
    needed = sum(len(data) for data in files.values())
    try:
        _check_space(checkpoint_dir, needed)
        temporary.mkdir()
        for name, data in files.items():
            _write_durably(temporary / name, data)
        _fsync_directory(temporary)
        if final.exists():  # left by an earlier training that was resumed from an older set
            _discard(final)
        temporary.rename(final)
        _fsync_directory(checkpoint_dir)
    except OSError as error:
        if error.errno not in _DISK_FULL:
            raise
        raise _disk_full(checkpoint_dir, f"the checkpoint of epoch {epoch} needs {needed / 1e6:.1f} MB") from None
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    for _, older in _sets(checkpoint_dir)[SETS_KEPT:]:
        _discard(older)
    return final


def _check_space(folder: Path, needed: int) -> None:
    """Fail before writing, rather than fill the disk and fail half-way."""
    if shutil.disk_usage(folder).free < needed:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder))


def _disk_full(checkpoint_dir: Path, what: str) -> PipelineError:
    newest = _sets(checkpoint_dir)[0][0] if _sets(checkpoint_dir) else 0
    resumes = f"resumes after epoch {newest}" if newest else "starts from its first epoch"
    return PipelineError(
        f"no space left on the device of {checkpoint_dir}: {what} "
        f"({shutil.disk_usage(checkpoint_dir).free / 1e6:.1f} MB free now). Free some space and rerun: "
        f"training {resumes}"
    )


@contextlib.contextmanager
def disk_space_explained(checkpoint_dir: str | Path) -> Iterator[None]:
    """Turn a full disk while training (the live history's write) into a PipelineError naming the folder."""
    try:
        yield
    except OSError as error:
        if error.errno not in _DISK_FULL:
            raise
        raise _disk_full(Path(checkpoint_dir), f"writing {error.filename or 'a file'} failed") from None


class EpochHistory(keras.callbacks.Callback):
    """Appends each epoch's metrics to the history CSV as it ends, numbered from 1 and named as
    metric_names says (Keras' CSVLogger numbers from 0 and keeps Keras' names)."""

    def __init__(self, history_path: Path):
        super().__init__()
        self.history_path = history_path

    def on_epoch_end(self, epoch, logs=None):
        append_history_row(self.history_path, epoch + 1, epoch_metrics(logs or {}))


class EpochCheckpoint(keras.callbacks.Callback):
    """Saves the set of each epoch as it ends (save_epoch). It comes after EpochHistory, whose row
    for the epoch the set's history must hold, and before anything that reports the epoch done."""

    def __init__(self, checkpoint_dir: str | Path, history_path: Path):
        super().__init__()
        self.checkpoint_dir = Path(checkpoint_dir)
        self.history_path = history_path

    def on_epoch_end(self, epoch, logs=None):
        save_epoch(self.checkpoint_dir, epoch + 1, self.model, self.history_path)


def recover_run_record(checkpoint_dir: str | Path) -> None:
    """Make sure a damaged `mlflow_run.json` does not make a resumed training start a new MLflow
    run: set it aside with a warning, and restore it from the newest set that holds a good copy."""
    record = Path(checkpoint_dir) / RUN_RECORD_FILE
    if record.exists():
        problem = run_record_problem(record.read_bytes())
        if problem is None:
            return
        aside = _set_aside(record)
        logger.warning("%s is damaged (%s): set aside as %s", record, problem, aside)
    for _, path in _sets(Path(checkpoint_dir)):
        try:
            copy = _checked_files(path)[1].get(RUN_RECORD_FILE)
        except DamagedSet:
            continue
        if copy is not None and run_record_problem(copy) is None:
            with atomic_path(record) as temporary:
                temporary.write_bytes(copy)
            logger.info("restored %s from %s", record, path)
            return


def training_key(params: Params, description: DatasetDescription) -> str:
    """A digest of everything a checkpoint depends on: train params, seed and the prepared data."""
    identity = {"train": params.train.model_dump(), "seed": params.seed, "data": description.as_written()}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def delete_other_checkpoint_dirs(checkpoints: str | Path, key: str) -> None:
    """Delete the checkpoint folders of trainings with other params or data than the training `key`
    (whose folder is `checkpoints / key`): at most one is kept on disk, and only the matching one
    is ever resumed."""
    checkpoints = Path(checkpoints)
    if checkpoints.is_dir():
        for stale in checkpoints.iterdir():
            if stale.name != key:
                logger.info("deleting %s: it was made with other params or data", stale)
                shutil.rmtree(stale, ignore_errors=True)
