"""AlexNet8 for 32 x 32 RGB images, layer for layer as in the original Keras script, taking raw pixels.

Reads and writes nothing.

The original script subclasses keras.Model; this is the same network as a functional model, so
it has a summary before training, a fixed input signature for MLflow, and saves to a `.keras`
file without custom objects. With 10 classes and 2048 dense units it has 9,639,178 parameters,
as the original. Its input is what any image library gives: RGB pixels from 0 to 255 (uint8 or
float). The model scales them to [0, 1] itself, and standardizes them with the training split's
statistics when the data was prepared so: the saved model is one file that needs nothing else.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import keras
import numpy as np
from keras import layers

from alexnet8.dataset import IMAGE_SHAPE


def pixel_normalization(inputs: keras.KerasTensor, normalization: Mapping | None) -> keras.KerasTensor:
    """Raw pixels (0-255) -> the network's inputs, as dataset.json's `normalization` says.

    `unit` divides by 255: Normalization(mean 0, variance 255²) computes x / sqrt(255²) = x / 255
    exactly, in float32, the original script's numerics bit for bit. `standardize` then subtracts
    the per-channel mean and divides by the standard deviation (both in [0, 1] units). Both layers
    compute in float32 under any precision policy: 16-bit pixels would lose their low bits.
    """
    x = layers.Normalization(mean=0.0, variance=255.0**2, dtype="float32", name="scale_to_unit")(inputs)
    name = (normalization or {}).get("name", "unit")
    if name == "standardize":
        mean, std = (np.asarray(normalization[key], dtype=np.float32) for key in ("mean", "std"))
        x = layers.Normalization(mean=mean, variance=np.square(std), dtype="float32", name="standardize")(x)
    elif name != "unit":
        raise ValueError(f"unknown normalization {name!r}: expected unit or standardize")
    return x


def build_alexnet8(
    num_classes: int = 10, dense_units: int = 2048, dropout: float = 0.5, normalization: Mapping | None = None
) -> keras.Model:
    """AlexNet8 on raw RGB pixels: normalization (see pixel_normalization), 5 convolutions (the first
    two batch-normalized), 3 max-pools, 3 dense layers, softmax output."""
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")

    inputs = keras.Input(shape=IMAGE_SHAPE, name="image")
    x = pixel_normalization(inputs, normalization)
    x = layers.Conv2D(96, kernel_size=3, name="conv1")(x)
    x = layers.BatchNormalization(name="conv1_batchnorm")(x)
    x = layers.Activation("relu", name="conv1_relu")(x)
    x = layers.MaxPooling2D(pool_size=3, strides=2, name="pool1")(x)

    x = layers.Conv2D(256, kernel_size=3, name="conv2")(x)
    x = layers.BatchNormalization(name="conv2_batchnorm")(x)
    x = layers.Activation("relu", name="conv2_relu")(x)
    x = layers.MaxPooling2D(pool_size=3, strides=2, name="pool2")(x)

    x = layers.Conv2D(384, kernel_size=3, padding="same", activation="relu", name="conv3")(x)
    x = layers.Conv2D(384, kernel_size=3, padding="same", activation="relu", name="conv4")(x)
    x = layers.Conv2D(256, kernel_size=3, padding="same", activation="relu", name="conv5")(x)
    x = layers.MaxPooling2D(pool_size=3, strides=2, name="pool3")(x)

    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(dense_units, activation="relu", name="dense1")(x)
    x = layers.Dropout(dropout, name="dropout1")(x)
    x = layers.Dense(dense_units, activation="relu", name="dense2")(x)
    x = layers.Dropout(dropout, name="dropout2")(x)
    # float32 probabilities even under a mixed-precision policy, where float16 softmax loses accuracy.
    outputs = layers.Dense(num_classes, activation="softmax", dtype="float32", name="class_probabilities")(x)
    return keras.Model(inputs, outputs, name="alexnet8")


def weights_digest(model: keras.Model) -> str:
    """sha256 of all the model's weight arrays, in order: equal digests mean bit-identical weights."""
    digest = hashlib.sha256()
    for weights in model.get_weights():
        digest.update(np.ascontiguousarray(weights).tobytes())
    return digest.hexdigest()
