"""Process-wide TensorFlow settings for training: numerics, determinism and the devices it runs on.

Reads and writes nothing.
"""

from __future__ import annotations

import logging

import keras
import tensorflow as tf

from alexnet8.params import TrainParams

logger = logging.getLogger(__name__)


def configure_runtime(params: TrainParams) -> None:
    """Apply the params' precision and determinism; call before building the model."""
    if params.deterministic:
        # Same seed, data and machine -> bit-identical weights (see docs, "Reproducibility").
        tf.config.experimental.enable_op_determinism()
    keras.mixed_precision.set_global_policy(params.precision)


def distribution_strategy() -> tf.distribute.Strategy:
    """Mirror over all GPUs when there are several; otherwise TensorFlow's default (one device)."""
    gpus = tf.config.list_logical_devices("GPU")
    if len(gpus) > 1:
        logger.info("training on %d GPUs with MirroredStrategy", len(gpus))
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()
