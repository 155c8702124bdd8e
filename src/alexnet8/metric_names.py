"""One name for each number the pipeline reports, and one numbering of epochs.

Reads and writes nothing: the names and the conversions between the forms each tool takes.

A number is named `<group>/<measure>`: `train/accuracy`, `val/loss`, `test/accuracy`,
`val_served/accuracy`. MLflow shows that name as it is, and draws one section of charts per group;
the history CSV (`dvc plots`) has it as a column; the metrics JSON files nest it
(`{"test": {"accuracy": ...}}`), which DVC shows as `test.accuracy`. The groups:

- `train`, `val`: after each epoch of training, on the (augmented) training split and on the
  validation split with one view per image (Keras' `accuracy`/`val_accuracy`);
- `test`, `val_served`: the evaluate stage's, through the served model (its test-time views).

Epochs are numbered from 1, everywhere a user sees them: the console, the history CSV's `epoch`,
MLflow's steps, `dvc plots` and the figures.
"""

from __future__ import annotations

from collections.abc import Mapping

# Keras' history keys -> the pipeline's names.
FROM_KERAS = {
    "accuracy": "train/accuracy",
    "loss": "train/loss",
    "val_accuracy": "val/accuracy",
    "val_loss": "val/loss",
}
EPOCH_METRICS = tuple(FROM_KERAS.values())
EPOCH_COLUMN = "epoch"
FIRST_EPOCH = 1
# The headline numbers the metrics files hold for `dvc metrics` and `dvc exp show` (MLflow has them
# all, the history CSV every epoch's): few enough that `dvc exp show --only-changed` fits 160
# columns with a changed param beside them.
TRAIN_HEADLINE = ("train/loss", "val/accuracy")  # after the last epoch
EVALUATE_HEADLINE = ("test/accuracy", "test/loss", "val_served/accuracy")


def epoch_metrics(keras_logs: Mapping[str, float]) -> dict[str, float]:
    """An epoch's Keras logs under the pipeline's names, in EPOCH_METRICS' order (the learning
    rate and other extras dropped)."""
    return {name: float(keras_logs[key]) for key, name in FROM_KERAS.items() if key in keras_logs}


def headline(metrics: Mapping[str, float], names: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """The metrics file's content: `names` of `metrics`, nested."""
    return nested({name: metrics[name] for name in names})


def nested(flat: Mapping[str, float]) -> dict[str, dict[str, float]]:
    """`{"test/accuracy": x}` -> `{"test": {"accuracy": x}}`: the metrics files' form (DVC: `test.accuracy`)."""
    groups: dict[str, dict[str, float]] = {}
    for name, value in flat.items():
        group, _, measure = name.partition("/")
        groups.setdefault(group, {})[measure] = value
    return groups
