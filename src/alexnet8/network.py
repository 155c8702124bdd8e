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
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
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


class FusedBatchNormalization(layers.BatchNormalization):
    """Keras' BatchNormalization computed, in training, by TensorFlow's fused kernel (oneDNN's on CPUs).

    Keras 3 normalizes a batch with separate ops (moments, then scale and shift), each a pass over
    the activations and another in the gradient: after conv1 that took more time than the
    convolution itself. The fused kernel does the same arithmetic in one pass each way, so only
    the order of rounding differs. The moving statistics are updated as Keras does, with the
    batch's biased variance (the kernel returns the unbiased one). Inference, and any case the
    kernel does not cover (masks, other axes), is Keras' own code. A model is saved with Keras'
    layer in its place (`portable_model`), so the file needs nothing of this package.
    """

    def call(self, inputs, training=None, mask=None):
        if not (training and self.trainable) or mask is not None or self.renorm or len(inputs.shape) != 4:
            return super().call(inputs, training=training, mask=mask)
        if self.axis not in (-1, 3):
            return super().call(inputs, training=training, mask=mask)
        outputs, mean, unbiased_variance = tf.compat.v1.nn.fused_batch_norm(
            tf.cast(inputs, "float32"), self.gamma, self.beta, epsilon=self.epsilon, is_training=True
        )
        count = tf.cast(tf.size(inputs) // tf.shape(inputs)[-1], "float32")
        variance = unbiased_variance * ((count - 1.0) / count)
        self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
        self.moving_variance.assign(self.moving_variance * self.momentum + variance * (1.0 - self.momentum))
        return tf.cast(outputs, inputs.dtype)


def build_alexnet8(
    num_classes: int = 10,
    dense_units: int = 2048,
    dropout: float = 0.5,
    normalization: Mapping | None = None,
    fused_batch_norm: bool = False,
    batch_norm_momentum: float = 0.99,
) -> keras.Model:
    """AlexNet8 on raw RGB pixels: normalization (see pixel_normalization), 5 convolutions (the first
    two batch-normalized, their moving statistics keeping `batch_norm_momentum` a step), 3
    max-pools, 3 dense layers, softmax output. With `fused_batch_norm`, the batch norms train with
    TensorFlow's fused kernel (FusedBatchNormalization)."""
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")

    inputs = keras.Input(shape=IMAGE_SHAPE, name="image")
    x = pixel_normalization(inputs, normalization)
    x = layers.Conv2D(96, kernel_size=3, name="conv1")(x)
    batch_norm_class = FusedBatchNormalization if fused_batch_norm else layers.BatchNormalization

    def batch_norm(name: str) -> layers.BatchNormalization:
        return batch_norm_class(momentum=batch_norm_momentum, name=name)

    x = batch_norm(name="conv1_batchnorm")(x)
    x = layers.Activation("relu", name="conv1_relu")(x)
    x = layers.MaxPooling2D(pool_size=3, strides=2, name="pool1")(x)

    x = layers.Conv2D(256, kernel_size=3, name="conv2")(x)
    x = batch_norm(name="conv2_batchnorm")(x)
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


def portable_model(model: keras.Model) -> keras.Model:
    """`model`'s layers and weights made only of Keras' own classes, uncompiled: Keras'
    BatchNormalization replaces every FusedBatchNormalization (at inference the two compute the
    same). A saved file of it loads anywhere and holds no optimizer state: a compiled clone would
    carry a fresh optimizer's zeros (twice the weights' size for Adam), not the training's state,
    which the checkpoints keep."""

    def keras_layer(layer):
        kind = layers.BatchNormalization if isinstance(layer, FusedBatchNormalization) else type(layer)
        return kind.from_config(layer.get_config())

    # clone_model recompiles a compiled model; the same layers in a new functional model are not compiled.
    uncompiled = keras.Model(model.inputs, model.outputs, name=model.name)
    copy = keras.models.clone_model(uncompiled, clone_function=keras_layer)
    copy.set_weights(model.get_weights())
    return copy


def whitening_kernel(images: np.ndarray, epsilon: float = 5e-4) -> np.ndarray:
    """A 3 x 3 convolution kernel that whitens the 3 x 3 patches of `images` (normalized, shape
    N, H, W, channels): shape (3, 3, channels, 2 * 9 * channels).

    The patches' second-moment matrix has eigenvectors v_i and eigenvalues l_i; filter i is
    v_i / sqrt(l_i + epsilon), strongest component first, and filter 9 * channels + i is its
    negative, so that the ReLU after it keeps both signs. airbench initializes its first layer so
    (Jordan, 2024); epsilon is its value, for inputs of unit scale.
    """
    channels = images.shape[-1]
    components = 3 * 3 * channels
    moments, count = np.zeros((components, components)), 0
    for start in range(0, len(images), 500):  # 500 images' patches at a time: 0.2 MB an image in float64
        # (n, H-2, W-2, channels, 3, 3) -> rows of (3, 3, channels), the order of a Keras kernel's first axes.
        windows = np.lib.stride_tricks.sliding_window_view(
            np.asarray(images[start : start + 500], np.float64), (3, 3), axis=(1, 2)
        )
        patches = windows.transpose(0, 1, 2, 4, 5, 3).reshape(-1, components)
        moments += patches.T @ patches
        count += len(patches)
    eigenvalues, eigenvectors = np.linalg.eigh(moments / count)
    order = np.argsort(eigenvalues)[::-1]
    scaled = eigenvectors[:, order] / np.sqrt(eigenvalues[order] + epsilon)
    return np.concatenate([scaled, -scaled], axis=1).reshape(3, 3, channels, 2 * components).astype(np.float32)


def initialize_conv1_whitening(model: keras.Model, raw_images: np.ndarray) -> None:
    """Initialize `model`'s conv1 to whiten the patches of `raw_images` (raw pixels, normalized as
    the model normalizes them): its first 54 filters (of 96) get whitening_kernel, its bias 0; the
    other filters keep their random initialization. conv1 then trains as any layer."""
    conv1 = model.get_layer("conv1")
    normalized = keras.Model(model.input, conv1.input)(np.asarray(raw_images), training=False)
    kernel, bias = conv1.get_weights()
    whitening = whitening_kernel(keras.ops.convert_to_numpy(normalized))[..., : kernel.shape[-1]]
    kernel[..., : whitening.shape[-1]] = whitening
    conv1.set_weights([kernel, np.zeros_like(bias)])


def refit_batch_norm_statistics(model: keras.Model, raw_images: np.ndarray, batch_size: int = 500) -> None:
    """Set each batch norm's moving mean and variance to the mean of its batch statistics over
    `raw_images` (raw pixels, in batches of `batch_size`) under the model's current weights.

    The moving statistics average the batches of the weights as they were when each batch ran;
    after the weights are replaced by an average of earlier weights (`use_ema`) they no longer
    match them. Running the images in training mode with momentum k / (k + 1) for the k-th batch
    (from 0) makes the moving statistics the plain mean over the batches, as PyTorch's cumulative
    batch-norm averaging does. Only the batch norms' statistics change.
    """
    norms = [layer for layer in model.layers if isinstance(layer, layers.BatchNormalization)]
    momentums = [norm.momentum for norm in norms]
    try:
        for batch, start in enumerate(range(0, len(raw_images), batch_size)):
            for norm in norms:
                norm.momentum = batch / (batch + 1)  # read by each eager call
            model(np.asarray(raw_images[start : start + batch_size]), training=True)
    finally:
        for norm, momentum in zip(norms, momentums, strict=True):
            norm.momentum = momentum


def weights_digest(model: keras.Model) -> str:
    """sha256 of all the model's weight arrays, in order: equal digests mean bit-identical weights."""
    digest = hashlib.sha256()
    for weights in model.get_weights():
        digest.update(np.ascontiguousarray(weights).tobytes())
    return digest.hexdigest()


def saved_weights_digest(path: str | Path) -> str:
    """weights_digest of the model saved in the `.keras` file `path`, as Keras loads it anywhere."""
    return weights_digest(keras.models.load_model(path, compile=False))
