#!/usr/bin/env python3
"""Where a training step's time goes: each AlexNet8 layer's forward and backward pass, timed alone.

Usage:
  python bench/layer_profile.py [--batch-size 32] [--precision float32] [--seconds 3] [--set KEY=VALUE ...]

Reads and writes nothing. For every layer of the model, times forward + backward (gradients for
the layer's weights and, except for the first layer, its input) on random inputs of the layer's
shape, then one whole training step on random images, with the model compiled as the train stage
compiles it from params.yaml (Adam and its loss at the defaults), and prints a
markdown table: milliseconds per batch, share of the step, forward+backward GFLOP (3x forward
multiply-adds x 2, for convolutions and dense layers) and the GFLOP/s reached. The sum of the
layers against the whole step shows what the rest (loss, optimizer update, framework) costs.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
import yaml
from keras import layers

from alexnet8.optimization import build_compiled_model
from alexnet8.params import TrainParams, load_params
from alexnet8.runtime import configure_runtime

PROJECT_ROOT = Path(__file__).resolve().parents[1]

logger = logging.getLogger("layer_profile")


@dataclass(frozen=True)
class LayerTime:
    name: str
    milliseconds: float  # per batch, forward + backward
    gflop: float  # per batch, forward + backward; 0 for layers without multiply-adds


def training_gflop(layer: keras.layers.Layer, batch_size: int) -> float:
    """Forward + backward GFLOP of a convolution or dense layer for one batch (backward = 2x forward)."""
    if isinstance(layer, layers.Conv2D):
        height, width, _ = layer.output.shape[1:]
        kernel_height, kernel_width, input_channels, output_channels = layer.kernel.shape
        multiply_adds = height * width * kernel_height * kernel_width * input_channels * output_channels
    elif isinstance(layer, layers.Dense):
        multiply_adds = math.prod(layer.kernel.shape)
    else:
        return 0.0
    return 3 * 2 * multiply_adds * batch_size / 1e9


def seconds_per_call(function: Callable[[], object], seconds: float) -> float:
    """Mean wall time of `function` over at least `seconds` (and 3 calls), after 2 warm-up calls."""
    for _ in range(2):
        function()
    calls, start = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - start < seconds:
        function()
        calls += 1
    return (time.perf_counter() - start) / calls


def profile_layers(model: keras.Model, batch_size: int, seconds: float) -> list[LayerTime]:
    """Forward + backward time of each layer of `model` (but its input), in order."""
    rows = []
    for index, layer in enumerate(model.layers[1:]):
        shape = (batch_size, *layer.input.shape[1:])
        inputs = tf.random.normal(shape, dtype=layer.compute_dtype)
        input_gradient = index > 0  # training never needs the gradient of the images themselves

        @tf.function
        def step(inputs, layer=layer, input_gradient=input_gradient):
            with tf.GradientTape() as tape:
                if input_gradient:
                    tape.watch(inputs)
                loss = tf.reduce_sum(tf.cast(layer(inputs, training=True), tf.float32))
            sources = ([inputs] if input_gradient else []) + list(layer.trainable_variables)
            return tape.gradient(loss, sources) if sources else loss

        elapsed = seconds_per_call(lambda step=step, inputs=inputs: step(inputs), seconds)
        rows.append(LayerTime(layer.name, 1000 * elapsed, training_gflop(layer, batch_size)))
    return rows


def time_training_step(model: keras.Model, batch_size: int, seconds: float, seed: int = 0) -> float:
    """Milliseconds per whole training step (forward, loss, backward, optimizer update) of a
    compiled model on random images."""
    generator = np.random.default_rng(seed)
    images = generator.random((batch_size, *model.input_shape[1:]), dtype=np.float32)
    labels = generator.integers(0, model.output_shape[-1], batch_size)
    return 1000 * seconds_per_call(lambda: model.train_on_batch(images, labels), seconds)


def table(rows: list[LayerTime], step_milliseconds: float, batch_size: int) -> str:
    lines = ["| layer | ms per batch | share of the step | GFLOP | GFLOP/s |", "| --- | --- | --- | --- | --- |"]
    for row in rows:
        rate = f"{row.gflop / row.milliseconds * 1000:.0f}" if row.gflop else ""
        flops = f"{row.gflop:.2f}" if row.gflop else ""
        lines.append(
            f"| {row.name} | {row.milliseconds:.1f} | {row.milliseconds / step_milliseconds:.0%} | {flops} | {rate} |"
        )
    layer_sum = sum(row.milliseconds for row in rows)
    total_gflop = sum(row.gflop for row in rows)
    lines.append(
        f"| sum of the layers | {layer_sum:.1f} | {layer_sum / step_milliseconds:.0%} | {total_gflop:.2f} "
        f"| {total_gflop / layer_sum * 1000:.0f} |"
    )
    lines.append(
        f"| whole training step | {step_milliseconds:.1f} | 100% | {total_gflop:.2f} "
        f"| {total_gflop / step_milliseconds * 1000:.0f} "
        f"({batch_size / step_milliseconds * 1000:.1f} images/s) |"
    )
    return "\n".join(lines)


def partition_set(assignment: str) -> tuple[str, str, str]:
    key, equals, value = assignment.partition("=")
    if not equals:
        raise SystemExit(f"--set {assignment}: expected KEY=VALUE")
    return key, equals, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=32)
    precisions = typing.get_args(TrainParams.model_fields["precision"].annotation)  # the values params.yaml accepts
    parser.add_argument("--precision", default="float32", choices=precisions)
    parser.add_argument("--seconds", type=float, default=3.0, help="minimum timing per layer")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="a train.* param, e.g. fused_batch_norm=false"
    )
    arguments = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    params = load_params(PROJECT_ROOT / "params.yaml")
    overrides = {
        key.removeprefix("train."): yaml.safe_load(value) for key, _, value in map(partition_set, arguments.set)
    }
    train_params = TrainParams.model_validate(
        params.train.model_dump() | overrides | {"precision": arguments.precision, "batch_size": arguments.batch_size}
    )
    configure_runtime(train_params)
    keras.utils.set_random_seed(params.seed)
    model = build_compiled_model(train_params, num_classes=10, steps_per_epoch=1)
    rows = profile_layers(model, arguments.batch_size, arguments.seconds)
    step_milliseconds = time_training_step(model, arguments.batch_size, arguments.seconds)
    logger.info(
        "%s, batch %d, %d CPUs:\n%s",
        arguments.precision,
        arguments.batch_size,
        os.cpu_count(),
        table(rows, step_milliseconds, arguments.batch_size),
    )


if __name__ == "__main__":
    main()
