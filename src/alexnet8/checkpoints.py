"""The state of an interrupted training, to resume it exactly.

Reads and writes `<checkpoints>/<key>/`, this training's checkpoint folder: Keras'
BackupAndRestore state (weights, optimizer, epoch), the dropout layers' random state, the
per-epoch history CSV, and the record of the MLflow run being continued. `<key>` is a digest of
everything the state depends on, so a checkpoint made with other params or data is never resumed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import keras
import numpy as np

from alexnet8.errors import PipelineError
from alexnet8.files import atomic_path
from alexnet8.params import Params

logger = logging.getLogger(__name__)

HISTORY_FILE = "history.csv"
RUN_RECORD_FILE = "mlflow_run.json"


class DropoutStateBackup(keras.callbacks.Callback):
    """Saves and restores the dropout layers' random state beside BackupAndRestore's checkpoint.

    Keras' weight files leave out SeedGenerator states, so a resumed run would draw other dropout
    masks than an uninterrupted one; with this, the two are bit-identical.
    """

    def __init__(self, checkpoint_dir: str | Path):
        super().__init__()
        self.path = Path(checkpoint_dir) / "random_state.npz"

    def _states(self):
        # Keyed by layer name: variable paths get process-wide counters and change between builds.
        return {
            layer.name: layer.seed_generator.state for layer in self.model.layers if hasattr(layer, "seed_generator")
        }

    def on_train_begin(self, logs=None):
        if self.path.exists():
            saved = np.load(self.path)
            for name, variable in self._states().items():
                variable.assign(saved[name])

    def on_epoch_end(self, epoch, logs=None):
        with atomic_path(self.path, suffix=".npz") as temporary:
            np.savez(temporary, **{name: np.asarray(variable) for name, variable in self._states().items()})


def completed_epochs(checkpoint_dir: str | Path) -> int:
    """Epochs an interrupted training finished, by its BackupAndRestore state (0 if there is none)."""
    metadata = Path(checkpoint_dir) / "training_metadata.json"
    try:
        return int(json.loads(metadata.read_text())["epoch"])
    except FileNotFoundError:
        return 0
    except (ValueError, KeyError, TypeError) as error:
        raise PipelineError(
            f"{metadata}: unreadable training state ({error}); delete {checkpoint_dir} to start over"
        ) from None


def training_key(params: Params, description: dict) -> str:
    """A digest of everything a checkpoint depends on: train params, seed and the prepared data."""
    identity = {"train": params.train.model_dump(), "seed": params.seed, "data": description}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def checkpoint_dir_for(checkpoints: str | Path, key: str) -> Path:
    """The checkpoint folder of the training `key`, after deleting those of trainings with other
    params or data: at most one is kept on disk, and only the matching one is ever resumed."""
    checkpoints = Path(checkpoints)
    if checkpoints.is_dir():
        for stale in checkpoints.iterdir():
            if stale.name != key:
                logger.info("deleting %s: it was made with other params or data", stale)
                shutil.rmtree(stale, ignore_errors=True)
    return checkpoints / key
