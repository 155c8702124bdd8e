"""What training minimizes and how: the loss and metric, the optimizer, and its learning-rate schedule.

Reads and writes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping

import keras
import tensorflow as tf

from alexnet8 import library_patches
from alexnet8.network import build_alexnet8
from alexnet8.params import TrainParams

# Variables that `decay_norm_and_bias: false` keeps out of weight decay: batch norms' gamma and beta,
# every bias. Keras matches the pattern against the name of the TensorFlow variable ("bias:0").
NOT_DECAYED_WHEN_EXCLUDED = [r"(^|/)(gamma|beta|bias)(:\d+)?$"]


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


class _FencedBuild:
    """Checks, when the optimizer is built, that Keras is a version the fused updates' use of its
    private API (library_patches.FUSED_OPTIMIZERS) was checked on."""

    def build(self, var_list):
        library_patches.FUSED_OPTIMIZERS.check()
        super().build(var_list)


class _FusedAdamUpdate(_FencedBuild):
    """Keras' Adam update of one weight, computed by TensorFlow's fused kernel (ResourceApplyAdam).

    Keras 3 updates each weight with a dozen separate ops, each a pass over the weight, its two
    moments or a temporary: at batch 32 that took 10% of AlexNet8's training step, most of it in
    the dense layers' 6.3 M weights. The kernel computes the same formula (moments, bias-corrected
    step size, epsilon added to the root of the second moment) in one pass, so only the order of
    rounding differs. Weight decay (AdamW) and the moving average (`use_ema`) stay Keras' own,
    applied around this update as before.
    """

    def update_step(self, gradient, variable, learning_rate):
        if self.amsgrad:
            return super().update_step(gradient, variable, learning_rate)
        dtype = variable.dtype
        step = tf.cast(self.iterations + 1, dtype)
        index = self._get_variable_index(variable)
        tf.raw_ops.ResourceApplyAdam(
            var=variable.handle,
            m=self._momentums[index].handle,
            v=self._velocities[index].handle,
            beta1_power=tf.pow(tf.cast(self.beta_1, dtype), step),
            beta2_power=tf.pow(tf.cast(self.beta_2, dtype), step),
            lr=tf.cast(learning_rate, dtype),
            beta1=tf.cast(self.beta_1, dtype),
            beta2=tf.cast(self.beta_2, dtype),
            epsilon=tf.cast(self.epsilon, dtype),
            grad=tf.cast(gradient, dtype),
        )


class FusedAdam(_FusedAdamUpdate, keras.optimizers.Adam):
    """Keras' Adam, each weight updated by TensorFlow's fused kernel (see _FusedAdamUpdate)."""


class FusedAdamW(_FusedAdamUpdate, keras.optimizers.AdamW):
    """Keras' AdamW, each weight updated by TensorFlow's fused kernel (see _FusedAdamUpdate)."""


class FusedSGD(_FencedBuild, keras.optimizers.SGD):
    """Keras' SGD with momentum, each weight updated by TensorFlow's fused kernel
    (ResourceApplyKerasMomentum: Keras' formula, Nesterov's too, in one pass instead of several)."""

    def update_step(self, gradient, variable, learning_rate):
        if not self.momentum:
            return super().update_step(gradient, variable, learning_rate)
        dtype = variable.dtype
        tf.raw_ops.ResourceApplyKerasMomentum(
            var=variable.handle,
            accum=self.momentums[self._get_variable_index(variable)].handle,
            lr=tf.cast(learning_rate, dtype),
            grad=tf.cast(gradient, dtype),
            momentum=tf.cast(self.momentum, dtype),
            use_nesterov=self.nesterov,
        )


def build_optimizer(params: TrainParams, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    """The optimizer `params` name, with TensorFlow's fused update kernels if `fused_optimizer`.
    With `ema_momentum`, it keeps a moving average of the weights, which `fit` writes into the
    model when it ends (Keras' `use_ema`)."""
    rate = learning_rate_or_schedule(params, steps_per_epoch)
    averaging = {"use_ema": True, "ema_momentum": params.ema_momentum} if params.ema_momentum else {}
    fused = params.fused_optimizer
    if params.optimizer == "adam":
        return (FusedAdam if fused else keras.optimizers.Adam)(learning_rate=rate, **averaging)
    if params.optimizer == "adamw":
        adamw = FusedAdamW if fused else keras.optimizers.AdamW
        optimizer = adamw(learning_rate=rate, weight_decay=params.weight_decay, **averaging)
    else:
        optimizer = (FusedSGD if fused else keras.optimizers.SGD)(
            learning_rate=rate,
            momentum=params.momentum,
            nesterov=params.momentum > 0,
            weight_decay=params.weight_decay or None,
            **averaging,
        )
    if not params.decay_norm_and_bias:
        optimizer.exclude_from_weight_decay(var_names=NOT_DECAYED_WHEN_EXCLUDED)
    return optimizer


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
        batch_norm_momentum=params.batch_norm_momentum,
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
