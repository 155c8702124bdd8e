"""The layer profiler's arithmetic and timings: the "where a training step's time goes" table of
docs/performance.md rests on them."""

from __future__ import annotations

import os

import numpy as np
import pytest
from helpers import load_script

from alexnet8.network import build_alexnet8
from alexnet8.optimization import build_compiled_model


@pytest.fixture(scope="module")
def layer_profile():
    return load_script("bench/layer_profile.py")


def test_a_training_image_costs_0_71_gflop(layer_profile):
    model = build_alexnet8()
    per_layer = {layer.name: layer_profile.training_gflop(layer, batch_size=1) for layer in model.layers}
    # conv1: 30 x 30 outputs x (3 x 3 x 3 inputs) x 96 filters multiply-adds, x2 FLOP, x3 for forward + backward.
    assert per_layer["conv1"] == pytest.approx(3 * 2 * 30 * 30 * 27 * 96 / 1e9)
    assert per_layer["dense2"] == pytest.approx(3 * 2 * 2048 * 2048 / 1e9)
    assert per_layer["conv1_batchnorm"] == per_layer["pool3"] == 0
    assert sum(per_layer.values()) == pytest.approx(0.7074, abs=1e-4)
    assert layer_profile.training_gflop(model.get_layer("conv4"), batch_size=32) == pytest.approx(
        32 * per_layer["conv4"]
    )


def test_every_layer_and_the_whole_step_are_timed(layer_profile, default_params):
    train_params = default_params.train.model_copy(update={"dense_units": 16, "batch_size": 4})
    model = build_compiled_model(train_params, num_classes=10, steps_per_epoch=1)
    rows = layer_profile.profile_layers(model, batch_size=4, seconds=0)
    assert [row.name for row in rows] == [layer.name for layer in model.layers[1:]]
    assert all(row.milliseconds > 0 for row in rows)
    step = layer_profile.time_training_step(model, batch_size=4, seconds=0)
    lines = layer_profile.table(rows, step, batch_size=4).splitlines()
    assert len(lines) == 2 + len(rows) + 2
    assert lines[-1].startswith("| whole training step |") and "images/s" in lines[-1]


def test_the_serving_bench_reports_images_per_second_percentiles_and_memory_against_the_baseline():
    serving_speed = load_script("bench/serving_speed.py")
    calls = []
    timing = serving_speed.time_calls(serving_speed.Timing("path", "form", 256), 4, lambda: calls.append(1), 3)
    assert len(calls) == 3 + 4 and len(timing.seconds) == 4
    timing = serving_speed.Timing("HTTP", "raw pixels, base64", 256, [0.5, 0.5, 1.0, 2.0], peak_bytes=2**30)
    baseline = serving_speed.Timing("in-process pyfunc", "uint8 array", 256, [0.25] * 4)
    assert timing.images_per_second == 256 * 4 / 4.0
    assert timing.percentile_ms(50) == 750 and 1950 < timing.percentile_ms(99) < 2000
    lines = serving_speed.table([timing], baseline).splitlines()
    assert lines[0] == "| path | input form | batch | calls | images/s | vs baseline | p50 ms | p99 ms | peak memory |"
    assert lines[2] == "| HTTP | raw pixels, base64 | 256 | 4 | 256.0 | 0.25x | 750.0 | 1,970.0 | 1.00 GB |"
    assert serving_speed.peak_memory(os.getpid()) > 0


# The original script's model, in miniature and in its style: a subclassed model whose `call` takes
# no `training`.
REFERENCE_STYLE_SCRIPT = """
import keras
from keras.layers import BatchNormalization, Conv2D, Dense, Dropout, Flatten


class Tiny(keras.Model):
    def __init__(self):
        super().__init__()
        self.c1 = Conv2D(filters=4, kernel_size=(3, 3))
        self.b1 = BatchNormalization()
        self.flatten = Flatten()
        self.d1 = Dropout(0.5)
        self.f1 = Dense(2, activation="softmax")

    def call(self, x):
        return self.f1(self.d1(self.flatten(self.b1(self.c1(x)))))
"""


def _moving_mean_after_fit(script: str) -> np.ndarray:
    namespace: dict = {}
    exec(script, namespace)
    model = namespace["Tiny"]()
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    images = np.random.default_rng(0).random((8, 6, 6, 3), dtype=np.float32) + 1.0
    model.fit(images, np.zeros(8, dtype=np.int64), batch_size=4, epochs=1, verbose=0)
    return model.b1.moving_mean.numpy()


def test_the_intended_reference_trains_its_batch_norm_which_the_script_as_written_does_not():
    benchmark = load_script("bench/benchmark.py")
    # As written, Keras 3 never tells the batch norm it is training: its statistics stay at 0 and 1.
    assert not _moving_mean_after_fit(REFERENCE_STYLE_SCRIPT).any()
    intended = benchmark.with_training_argument(REFERENCE_STYLE_SCRIPT)
    assert "def call(self, x, training=None):" in intended
    assert _moving_mean_after_fit(intended).any()
    with pytest.raises(SystemExit, match="expected one `def call\\(self, x\\):` in the reference, found 0"):
        benchmark.with_training_argument(intended)
