"""Recipes (recipe.py, recipes/): each trains the same network, `make recipe` runs one as a DVC
experiment; and what the recipes' training knobs (weight averaging, label smoothing, mixed
precision) do to a training."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from helpers import PROJECT_ROOT, committed_repository, minimal_environment, run_command

from alexnet8.params import TrainParams
from alexnet8.recipe import checked_overrides, load_recipe, recipe_names

RECIPES = PROJECT_ROOT / "recipes"


@pytest.mark.parametrize("name", recipe_names(RECIPES))
def test_every_recipe_trains_the_same_network_for_5_epochs_on_the_same_data(name, default_params):
    """Recipes compete on one footing: AlexNet8 unchanged, 5 epochs, the data params.yaml names."""
    overrides = load_recipe(name, RECIPES)
    checked_overrides(overrides, PROJECT_ROOT / "params.yaml", source=name)
    assert not {key for key in overrides if key.startswith("fetch.")}
    assert overrides.get("train.epochs", 5) == 5 and "train.dense_units" not in overrides
    defaults = default_params.flat()
    assert not [key for key, value in overrides.items() if defaults[key] == value], "a key set to its default"


def test_make_recipe_runs_the_recipe_file_as_a_dvc_experiment():
    make = [
        "make",
        "-n",
        "--no-print-directory",
        "recipe",
        "NAME=recipe-sgd",
        "EXP=sgd-seed7",
        "SET=seed=7 train.precision=float32",
    ]
    recipe_command = shlex.split(run_command(make, PROJECT_ROOT, minimal_environment()).strip().splitlines()[-1])
    assert recipe_command[:3] == ["python", "-m", "alexnet8.recipe"]
    output = run_command([*recipe_command, "--dry-run"], PROJECT_ROOT)
    command = shlex.split(output.strip().splitlines()[-1])
    assert command[:5] == ["dvc", "exp", "run", "-n", "sgd-seed7"]
    settings = dict(item.split("=", 1) for item in command[6::2])
    assert command[5::2] == ["-S"] * len(settings)
    expected = {
        key: str(value).lower() if isinstance(value, bool) else str(value)
        for key, value in load_recipe("recipe-sgd", RECIPES).items()
    }
    assert settings == expected | {"seed": "7", "train.precision": "float32"}


def _project_with_committed_params(folder: Path, params_text: str) -> Path:
    """A git repository in `folder` whose last commit holds `params_text` as params.yaml and recipe-sgd."""
    recipe = (RECIPES / "recipe-sgd.yaml").read_text()
    return committed_repository(folder / "project", {"params.yaml": params_text, "recipes/recipe-sgd.yaml": recipe})


def _dry_run_recipe_sgd(folder: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "alexnet8.recipe", "recipe-sgd", "--dry-run"], cwd=folder, capture_output=True, text=True
    )


def test_a_recipe_runs_on_the_committed_params_not_on_what_the_last_experiment_left(tmp_path):
    """`dvc exp run` leaves its params in the workspace's params.yaml; the next recipe must not inherit them."""
    project = _project_with_committed_params(tmp_path, (PROJECT_ROOT / "params.yaml").read_text())
    left = (project / "params.yaml").read_text().replace("label_smoothing: 0.0 ", "label_smoothing: 0.2 ")
    (project / "params.yaml").write_text(left.replace("dropout: 0.5 ", "dropout: 0.0 "))

    result = _dry_run_recipe_sgd(project)

    assert result.returncode == 0, result.stderr
    command = shlex.split(result.stdout.strip().splitlines()[-1])
    assert "train.label_smoothing=0.0" in command and "train.dropout=0.0" in command
    assert "train.label_smoothing=0.2" not in command
    assert "differs from the last commit in train.label_smoothing" in result.stderr


def test_a_committed_params_file_with_a_duplicate_key_is_named_as_the_committed_one(tmp_path):
    committed = (PROJECT_ROOT / "params.yaml").read_text()
    project = _project_with_committed_params(tmp_path, committed + "seed: 7\n")
    (project / "params.yaml").write_text(committed)  # fixed in the workspace, not yet committed

    result = _dry_run_recipe_sgd(project)

    assert result.returncode == 1
    assert "params.yaml in the last commit: not valid YAML: " in result.stderr
    assert "duplicate key 'seed'" in result.stderr
    assert "dvc exp run" not in result.stdout


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["recipe-sgdd"], "recipes/recipe-sgdd.yaml: no such recipe (available in recipes/: original,"),
        (["recipe-sgd", "--set", "train.optimiser=sgd"], "train.optimiser: unknown key"),
        (["recipe-sgd", "--set", "train.epochs=0"], "train.epochs: Input should be greater than 0"),
    ],
)
def test_a_bad_recipe_or_setting_is_named_and_nothing_runs(arguments, message):
    result = subprocess.run(
        [sys.executable, "-m", "alexnet8.recipe", *arguments], cwd=PROJECT_ROOT, capture_output=True, text=True
    )
    assert result.returncode == 1 and message in result.stderr and "dvc exp run" not in result.stdout + result.stderr


def test_weight_averaging_saves_the_moving_average_of_every_steps_weights(prepared_dir, tmp_path, default_params):
    from alexnet8.dataset import load_split
    from alexnet8.train import train_model

    class WeightsAfterEachStep(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.steps = []

        def on_train_batch_end(self, batch, logs=None):
            self.steps.append([variable.numpy().copy() for variable in self.model.trainable_variables])

    momentum = 0.6
    params = TrainParams(
        **(default_params.train.model_dump() | {"epochs": 2, "dense_units": 16, "ema_momentum": momentum})
    )
    recorder = WeightsAfterEachStep()
    model, _ = train_model(
        params,
        1,
        load_split(prepared_dir, "train"),
        load_split(prepared_dir, "validation"),
        10,
        tmp_path / "checkpoints",
        callbacks=[recorder],
    )
    average = recorder.steps[0]  # Keras starts the average at the first step's weights
    for weights in recorder.steps[1:]:
        average = [momentum * mean + (1 - momentum) * value for mean, value in zip(average, weights, strict=True)]
    assert len(recorder.steps) == 2 * 3  # 90 images, batch 32
    for saved, expected, last in zip(model.trainable_variables, average, recorder.steps[-1], strict=True):
        np.testing.assert_allclose(saved.numpy(), expected, rtol=1e-5, atol=1e-7)
        assert not np.allclose(saved.numpy(), last)


def test_label_smoothing_trains_on_smoothed_one_hot_targets(prepared_dir, tmp_path, default_params):
    from alexnet8.dataset import load_split
    from alexnet8.input_pipeline import training_dataset
    from alexnet8.optimization import build_compiled_model

    params = TrainParams(**(default_params.train.model_dump() | {"label_smoothing": 0.1, "dense_units": 16}))
    split = load_split(prepared_dir, "train")
    _, labels = next(training_dataset(params, split, seed=1, num_classes=10).as_numpy_iterator())
    assert labels.shape == (32, 10) and np.all(labels.sum(axis=1) == 1)
    model = build_compiled_model(params, num_classes=10, steps_per_epoch=4)
    assert model.loss.get_config()["label_smoothing"] == pytest.approx(0.1)
    # A confident right answer still costs something: the target is 0.91 / 0.01, not 1 / 0.
    confident = np.full((1, 10), 1e-6, np.float32)
    confident[0, 3] = 1 - 9e-6
    assert float(model.loss(np.eye(10, dtype=np.float32)[[3]], confident)) > 0.1


@pytest.mark.parametrize(("precision", "compute_dtype"), [("mixed_float16", "float16"), ("mixed_bfloat16", "bfloat16")])
def test_gpu_settings_run_on_the_cpu(prepared_dir, tmp_path, default_params, precision, compute_dtype):
    """Mixed precision and XLA are mostly for accelerators, but the same code path must run anywhere."""
    import keras
    import tensorflow as tf

    from alexnet8.dataset import load_split
    from alexnet8.runtime import configure_runtime, distribution_strategy
    from alexnet8.train import train_model

    params = TrainParams(
        **(
            default_params.train.model_dump()
            | {"epochs": 1, "batch_size": 16, "dense_units": 16, "precision": precision, "jit_compile": True}
        )
    )
    configure_runtime(params)
    try:
        assert keras.mixed_precision.global_policy().name == precision
        model, history = train_model(
            params, 1, load_split(prepared_dir, "train"), load_split(prepared_dir, "validation"), 10, tmp_path / "b"
        )
        assert model.get_layer("conv1").compute_dtype == compute_dtype and model.output.dtype == "float32"
        assert np.isfinite(history["train/loss"]).all()
        gpus = len(tf.config.list_logical_devices("GPU"))
        assert distribution_strategy().num_replicas_in_sync == (gpus if gpus > 1 else 1)
    finally:
        keras.mixed_precision.set_global_policy("float32")
