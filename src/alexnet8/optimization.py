"""What training minimizes and how: the loss and metric, the optimizer, and its learning-rate schedule.

Reads and writes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping

import keras

from alexnet8.model import build_alexnet8
from alexnet8.params import TrainParams


def learning_rate_or_schedule(
    params: TrainParams, steps_per_epoch: int
) -> float | keras.optimizers.schedules.LearningRateSchedule:
    """The constant rate, or the per-step `warmup_cosine` schedule: linear from peak / 25 up to the
    peak over `warmup_fraction` of all steps, then a cosine down to 0 (the one-cycle shape). The
    peak is `params.peak_learning_rate`."""
    peak = params.peak_learning_rate
    if params.lr_schedule == "constant":
        return peak
    total_steps = params.epochs * steps_per_epoch
    warmup_steps = int(params.warmup_fraction * total_steps)
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=peak / 25 if warmup_steps else peak,
        decay_steps=max(total_steps - warmup_steps, 1),
        warmup_target=peak if warmup_steps else None,
        warmup_steps=warmup_steps,
        alpha=0.0,
    )


def build_optimizer(params: TrainParams, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    """The optimizer `params` name. With `ema_momentum`, it keeps a moving average of the weights,
    which `fit` writes into the model when it ends (Keras' `use_ema`)."""
    rate = learning_rate_or_schedule(params, steps_per_epoch)
    averaging = {"use_ema": True, "ema_momentum": params.ema_momentum} if params.ema_momentum else {}
    if params.optimizer == "adam":
        return keras.optimizers.Adam(learning_rate=rate, **averaging)
    if params.optimizer == "adamw":
        return keras.optimizers.AdamW(learning_rate=rate, weight_decay=params.weight_decay, **averaging)
    return keras.optimizers.SGD(
        learning_rate=rate,
        momentum=params.momentum,
        nesterov=params.momentum > 0,
        weight_decay=params.weight_decay or None,
        **averaging,
    )


def build_compiled_model(
    params: TrainParams, num_classes: int, steps_per_epoch: int, normalization: Mapping | None = None
) -> keras.Model:
    """AlexNet8 as `params` shape it, on raw pixels normalized as `normalization` (dataset.json's)
    says, compiled with its loss, accuracy metric and optimizer."""
    model = build_alexnet8(
        num_classes=num_classes,
        dense_units=params.dense_units,
        dropout=params.dropout,
        normalization=normalization,
        fused_batch_norm=params.fused_batch_norm,
    )
    if params.label_smoothing:
        # Smoothing needs one-hot targets (input_pipeline.one_hot_length); same metric names either way.
        loss = keras.losses.CategoricalCrossentropy(label_smoothing=params.label_smoothing)
        accuracy = keras.metrics.CategoricalAccuracy(name="accuracy")
    else:
        loss = keras.losses.SparseCategoricalCrossentropy()
        accuracy = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
    model.compile(
        optimizer=build_optimizer(params, steps_per_epoch),
        loss=loss,
        metrics=[accuracy],
        jit_compile=params.jit_compile,
    )
    return model
