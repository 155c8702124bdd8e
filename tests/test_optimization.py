"""What training minimizes and how (optimization.py): the schedules, the optimizers, and the fused
optimizers updating weights as Keras' own do, up to rounding, wherever training runs."""

from __future__ import annotations

import json
import zipfile

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import PROJECT_ROOT, saved_model_config, write_params

from alexnet8.optimization import (
    FusedAdam,
    FusedAdamW,
    FusedSGD,
    build_compiled_model,
    build_optimizer,
    learning_rate_or_schedule,
)
from alexnet8.params import TrainParams, load_params
from alexnet8.recipe import load_recipe

SCHEDULE = keras.optimizers.schedules.CosineDecay(0.01, decay_steps=5, warmup_target=0.05, warmup_steps=2)

PAIRS = {
    "adam": lambda: (keras.optimizers.Adam(0.01), FusedAdam(0.01)),
    "adam, schedule, moving average": lambda: (
        keras.optimizers.Adam(SCHEDULE, use_ema=True, ema_momentum=0.5),
        FusedAdam(SCHEDULE, use_ema=True, ema_momentum=0.5),
    ),
    "adamw": lambda: (keras.optimizers.AdamW(0.01, weight_decay=0.1), FusedAdamW(0.01, weight_decay=0.1)),
    "sgd, nesterov": lambda: (
        keras.optimizers.SGD(SCHEDULE, momentum=0.9, nesterov=True, weight_decay=0.01),
        FusedSGD(SCHEDULE, momentum=0.9, nesterov=True, weight_decay=0.01),
    ),
    "sgd, momentum": lambda: (keras.optimizers.SGD(0.1, momentum=0.5), FusedSGD(0.1, momentum=0.5)),
    "sgd": lambda: (keras.optimizers.SGD(0.1), FusedSGD(0.1)),
}


@pytest.mark.parametrize("name", PAIRS)
def test_a_fused_optimizer_updates_weights_as_keras_does_up_to_rounding(name):
    """Weights, moments and moving average after 5 steps of the same gradients, of sizes from
    1 to 1e-6 (Adam divides by the root of the second moment: small gradients take full steps)."""
    rng = np.random.default_rng(0)
    start = rng.normal(size=(300, 40)).astype(np.float32)
    gradients = [rng.normal(size=start.shape).astype(np.float32) * scale for scale in (1, 1e-3, 1e-6, 1, 0.1)]
    results = []
    for optimizer in PAIRS[name]():
        weight = keras.Variable(start.copy())
        optimizer.build([weight])
        for gradient in gradients:
            optimizer.apply_gradients([(tf.constant(gradient), weight)])
        results.append((weight.numpy(), [variable.numpy() for variable in optimizer.variables]))
    (keras_weight, keras_state), (fused_weight, fused_state) = results
    assert not np.array_equal(keras_weight, start)
    np.testing.assert_allclose(fused_weight, keras_weight, rtol=1e-6, atol=1e-6)
    assert len(fused_state) == len(keras_state)  # same slots: checkpoints of either restore into the other
    for fused, expected in zip(fused_state, keras_state, strict=True):
        np.testing.assert_allclose(fused, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    ("optimizer", "fused", "expected"),
    [
        ("adam", True, FusedAdam),
        ("adamw", True, FusedAdamW),
        ("sgd", True, FusedSGD),
        ("adam", False, keras.optimizers.Adam),
        ("sgd", False, keras.optimizers.SGD),
    ],
)
def test_fused_optimizer_chooses_the_fused_kernels_or_keras_own(default_params, optimizer, fused, expected):
    params = default_params.train.model_copy(update={"optimizer": optimizer, "fused_optimizer": fused})
    assert type(build_optimizer(params, steps_per_epoch=10)) is expected


def test_the_fused_update_runs_inside_an_xla_compiled_training_step(default_params):
    """`jit_compile: auto` turns XLA on for AVX2-only CPUs: the fused kernel must compile there and
    take the same first step (Adam's: about 0.001 for each weight with a gradient)."""
    images = np.random.default_rng(2).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    steps = []
    for jit_compile in (False, True):
        params = default_params.train.model_copy(update={"dense_units": 16, "dropout": 0.0, "jit_compile": jit_compile})
        keras.utils.set_random_seed(3)
        model = build_compiled_model(params, num_classes=10, steps_per_epoch=1)
        assert isinstance(model.optimizer, FusedAdam)
        before = model.get_layer("class_probabilities").get_weights()[0]
        model.train_on_batch(images, np.arange(4))
        steps.append(model.get_layer("class_probabilities").get_weights()[0] - before)
    plain, xla = steps
    assert np.median(np.abs(xla)) == pytest.approx(0.001, rel=0.01)
    # Rounding may flip the sign of a step whose gradient is near zero, nothing more.
    assert np.mean(np.isclose(xla, plain, atol=1e-5)) > 0.9


@pytest.mark.parametrize(
    ("optimizer", "precision"),
    [("adam", "float32"), ("adamw", "float32"), ("sgd", "float32"), ("adam", "mixed_float16")],
)
def test_a_model_trained_with_a_fused_optimizer_saves_as_keras_own_layers_without_optimizer_state(
    default_params, tmp_path, optimizer, precision
):
    from alexnet8.network import portable_model

    params = default_params.train.model_copy(update={"dense_units": 16, "optimizer": optimizer, "momentum": 0.9})
    keras.mixed_precision.set_global_policy(precision)  # mixed_float16 wraps the optimizer in a loss scaler
    try:
        model = build_compiled_model(params, num_classes=10, steps_per_epoch=1)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    images = np.random.default_rng(4).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    model.train_on_batch(images, np.arange(4))
    portable_model(model).save(tmp_path / "model.keras")

    config, packages = saved_model_config(tmp_path / "model.keras")
    assert packages == {"keras"} and not json.loads(config).get("compile_config")
    with zipfile.ZipFile(tmp_path / "model.keras") as archive, h5py.File(archive.open("model.weights.h5")) as weights:
        assert "optimizer" not in weights  # a fresh optimizer's zeros would be as large as the weights, or twice
    loaded = keras.saving.load_model(tmp_path / "model.keras")
    assert not loaded.compiled
    np.testing.assert_array_equal(loaded.predict(images, verbose=0), model.predict(images, verbose=0))


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("decay_norm_and_bias", [True, False])
def test_weight_decay_spares_batch_norm_and_biases_when_asked(default_params, fused, decay_norm_and_bias):
    params = default_params.train.model_copy(
        update={
            "optimizer": "sgd",
            "momentum": 0.9,
            "weight_decay": 0.5,
            "fused_optimizer": fused,
            "decay_norm_and_bias": decay_norm_and_bias,
        }
    )
    optimizer = build_optimizer(params, steps_per_epoch=10)
    variables = [keras.Variable(np.ones(3, np.float32), name=name) for name in ("kernel", "bias", "gamma", "beta")]
    optimizer.apply([np.zeros(3, np.float32)] * len(variables), variables)  # only weight decay moves them
    shrunk = {variable.name: bool(np.all(variable.numpy() < 1)) for variable in variables}
    assert shrunk == {
        "kernel": True,
        "bias": decay_norm_and_bias,
        "gamma": decay_norm_and_bias,
        "beta": decay_norm_and_bias,
    }


@pytest.fixture
def recipe(tmp_path):
    """recipe-fast's params: AdamW 0.002, one-cycle with 20% warmup, weight decay 0.0005."""
    return load_params(write_params(tmp_path / "params.yaml", **load_recipe("recipe-fast", PROJECT_ROOT / "recipes")))


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
