"""The training recipe knobs: augmentation, schedules, optimizers and test-time augmentation do what they say."""

from __future__ import annotations

import shlex
import subprocess
import sys

import keras
import numpy as np
import pytest
from helpers import PROJECT_ROOT, minimal_environment, run_command, write_params

from alexnet8.dataset import Split
from alexnet8.input_pipeline import make_dataset
from alexnet8.optimization import build_optimizer, learning_rate_or_schedule
from alexnet8.params import TrainParams, load_params
from alexnet8.recipe import checked_overrides, load_recipe, recipe_names

RECIPES = PROJECT_ROOT / "recipes"


@pytest.fixture
def recipe(tmp_path):
    """recipe-fast's params: AdamW 0.002, one-cycle with 20% warmup, weight decay 0.0005."""
    return load_params(write_params(tmp_path / "params.yaml", **load_recipe("recipe-fast", RECIPES)))


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


def test_warmup_cosine_rises_to_the_peak_then_falls_to_zero(recipe):
    schedule = learning_rate_or_schedule(recipe.train, steps_per_epoch=100)
    total, warmup = 5 * 100, int(0.2 * 500)
    rates = np.array([float(schedule(step)) for step in range(total + 1)])
    assert rates[0] == pytest.approx(0.002 / 25)
    assert rates[warmup] == pytest.approx(0.002) and rates.max() == pytest.approx(0.002)
    assert np.all(np.diff(rates[: warmup + 1]) > 0) and np.all(np.diff(rates[warmup:]) <= 0)
    assert rates[-1] == pytest.approx(0, abs=1e-9)


def test_constant_schedule_and_optimizers(recipe, default_params):
    assert learning_rate_or_schedule(default_params.train, 100) == 0.001
    adamw = build_optimizer(recipe.train, 100)
    assert isinstance(adamw, keras.optimizers.AdamW) and adamw.weight_decay == pytest.approx(0.0005)
    sgd = build_optimizer(
        TrainParams(**(default_params.train.model_dump() | {"optimizer": "sgd", "momentum": 0.9})), 100
    )
    assert isinstance(sgd, keras.optimizers.SGD) and sgd.nesterov and sgd.momentum == 0.9


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


def _asymmetric_split(count=64):
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)  # raw pixels, as the model takes them
    return Split(images=images, labels=(np.arange(count) % 10).astype(np.uint8))


def _first_epoch(dataset, count, batch_size):
    batches = list(dataset.take(int(np.ceil(count / batch_size))).as_numpy_iterator())
    return np.concatenate([images for images, _ in batches]), np.concatenate([labels for _, labels in batches])


def test_random_flip_keeps_each_label_with_its_image():
    split = _asymmetric_split()
    images, labels = _first_epoch(make_dataset(split, 16, shuffle_seed=1, random_flip=True), 64, 16)
    flipped = 0
    for image, label in zip(images, labels, strict=True):
        [match] = [
            index
            for index, original in enumerate(split.images)
            if np.array_equal(image, original) or np.array_equal(image, original[:, ::-1])
        ]
        assert split.labels[match] == label
        flipped += not np.array_equal(image, split.images[match])
    assert 10 < flipped < 54  # about half


def _flipped_per_image(split, images):
    """Whether each of the split's images appears mirrored in `images` (one epoch of them)."""
    flipped = {}
    for image in images:
        [(index, mirrored)] = [
            (index, mirrored)
            for index, original in enumerate(split.images)
            for mirrored, candidate in ((False, original), (True, original[:, ::-1]))
            if np.array_equal(image, candidate)
        ]
        flipped[index] = mirrored
    return np.array([flipped[index] for index in range(len(split.images))])


def test_alternating_flip_shows_each_image_the_other_way_each_epoch():
    split = _asymmetric_split()
    dataset = make_dataset(split, 16, shuffle_seed=1, random_flip="alternating")
    batches = list(dataset.take(3 * 4).as_numpy_iterator())  # 3 epochs of 4 batches
    epochs = [np.concatenate([images for images, _ in batches[4 * epoch : 4 * epoch + 4]]) for epoch in range(3)]
    first, second, third = (_flipped_per_image(split, images) for images in epochs)
    assert 10 < first.sum() < 54  # about half, at random
    np.testing.assert_array_equal(second, ~first)
    np.testing.assert_array_equal(third, first)
    resumed = make_dataset(split, 16, shuffle_seed=1, first_epoch=1, random_flip="alternating")
    resumed_images = np.concatenate([images for images, _ in resumed.take(4).as_numpy_iterator()])
    np.testing.assert_array_equal(_flipped_per_image(split, resumed_images), second)


def test_random_crop_is_a_window_of_the_reflect_padded_image():
    split = _asymmetric_split()
    images, labels = _first_epoch(make_dataset(split, 16, shuffle_seed=1, random_crop_padding=4), 64, 16)
    shifted = 0
    for image, label in zip(images, labels, strict=True):
        candidates = [index for index in range(64) if split.labels[index] == label]
        padded = {index: np.pad(split.images[index], ((4, 4), (4, 4), (0, 0)), mode="reflect") for index in candidates}
        windows = [
            (index, row, column)
            for index in candidates
            for row in range(9)
            for column in range(9)
            if np.array_equal(padded[index][row : row + 32, column : column + 32], image)
        ]
        assert windows, "not a crop of any image with this label"
        shifted += windows[0][1:] != (4, 4)
    assert shifted > 40


def test_augmentation_is_a_function_of_seed_and_epoch():
    split = _asymmetric_split()
    options = dict(shuffle_seed=5, random_flip=True, random_crop_padding=4, cutout_size=8)
    epoch_two, _ = _first_epoch(make_dataset(split, 16, first_epoch=2, **options), 64, 16)
    from_start = make_dataset(split, 16, **options).skip(2 * 4)
    again, _ = _first_epoch(from_start, 64, 16)
    np.testing.assert_array_equal(epoch_two, again)  # what a resumed run sees at epoch 2


def test_cutout_zeroes_one_square_per_image_and_keeps_labels():
    split = _asymmetric_split()
    images, labels = _first_epoch(make_dataset(split, 16, shuffle_seed=1, cutout_size=8), 64, 16)
    for image, label in zip(images, labels, strict=True):
        [match] = [
            index
            for index, original in enumerate(split.images)
            if np.array_equal((image == 0) | (image == original), np.ones_like(image, bool))
        ]
        assert split.labels[match] == label
        zero_rows, zero_columns = np.nonzero((image == 0).all(axis=2))
        # One rectangle of at most 8 x 8 (smaller where it hangs over an edge), at least 4 x 4.
        height, width = np.ptp(zero_rows) + 1, np.ptp(zero_columns) + 1
        assert 4 <= height <= 8 and 4 <= width <= 8 and len(zero_rows) == height * width


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


@pytest.mark.parametrize(("scaling", "factor"), [("none", 1.0), ("linear", 4.0), ("sqrt", 2.0)])
def test_learning_rate_scales_with_the_batch_size(default_params, scaling, factor):
    params = TrainParams(
        **(
            default_params.train.model_dump()
            | {
                "batch_size": 128,
                "lr_batch_scaling": scaling,
                "lr_reference_batch_size": 32,
                "lr_schedule": "warmup_cosine",
                "warmup_fraction": 0.1,
            }
        )
    )
    assert params.peak_learning_rate == pytest.approx(0.001 * factor)
    schedule = learning_rate_or_schedule(params, steps_per_epoch=10)
    assert max(float(schedule(step)) for step in range(51)) == pytest.approx(0.001 * factor)


def test_validation_and_test_data_are_never_augmented():
    split = _asymmetric_split(20)
    images, _ = _first_epoch(make_dataset(split, 8), 20, 8)
    np.testing.assert_array_equal(images, split.images)


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


def test_training_batches_are_read_from_the_file_as_from_the_array(prepared_dir):
    from alexnet8.dataset import load_split

    from_file = load_split(prepared_dir, "train")
    assert from_file.images_path is not None
    in_memory = Split(images=np.array(from_file.images), labels=np.array(from_file.labels))
    from_file_batches, in_memory_batches = (
        _first_epoch(make_dataset(split, 16, shuffle_seed=5, random_flip=True), len(split.labels), 16)
        for split in (from_file, in_memory)
    )
    for read, indexed in zip(from_file_batches, in_memory_batches, strict=True):
        np.testing.assert_array_equal(read, indexed)


def test_a_truncated_image_file_is_named(prepared_dir, tmp_path):
    import shutil

    from alexnet8.dataset import ImageReader, image_file, load_split
    from alexnet8.errors import DataError

    shutil.copytree(prepared_dir, tmp_path / "prepared")
    split = load_split(tmp_path / "prepared", "train")
    with open(split.images_path, "r+b") as stream:
        stream.truncate(split.images_path.stat().st_size - 100)
    with pytest.raises(DataError, match=image_file("train")):
        ImageReader(split)(np.array([len(split.labels) - 1]))
