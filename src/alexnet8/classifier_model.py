"""The model as MLflow logs and serves it: raw RGB pixels in, class names and probabilities out.

Reads (when MLflow loads the model): the artifacts logged with it, `keras_model` (the trained
`.keras` file, which normalizes pixels itself) and `dataset` (dataset.json: the class names),
and its model config (the MLmodel file's `model_config`): the test-time views, `flip_tta` and
`tta_translate`, as the `evaluate.*` params of the evaluation that logged it set them.
Writes: nothing.

The evaluate stage scores the model through this same class (`ImageClassifier.probabilities`),
so the accuracy it logs, writes and promotes on is what a user of the logged model gets.

MLflow logs this file as the model's code ("models from code"): it is copied into the logged
model and run when the model is loaded, by `mlflow.pyfunc.load_model` or `mlflow models serve`,
where this package may not be installed. So it imports nothing of the package, only what the
model's requirements name (MLflow, Keras, TensorFlow, NumPy, pandas).

Input: uint8 (or integral 0-255 float) pixels, shape (n, 32, 32, 3), RGB, n from 1 to
MAX_IMAGES. Output: one row per image, the column `class` (the most probable class name) and
one column per class name holding its probability. Over HTTP (`/invocations`, JSON
`{"inputs": [image, ...]}`), that is `{"predictions": [{"class": "cat", "airplane": 0.01, ...}, ...]}`.

Over HTTP, MLflow's scoring server casts the JSON to the signature's uint8 before the model sees
it (`np.array(data, dtype=uint8)`): floats lose their fraction (12.7 becomes 12), numeric strings
and booleans pass; values outside 0-255, NaN, other strings, an empty batch and shapes other than
(n, 32, 32, 3) are refused there, with HTTP 400 and MLflow's messages. The model itself refuses a
batch of more than MAX_IMAGES, after the server has parsed the whole request. MLflow's error
messages embed the input's repr, so `load_context` makes NumPy print large arrays in a few short
lines (`[[0 ... 0] ... [0 ... 0]]`): process-wide, in any process that loads this model.
"""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

IMAGE_SHAPE = (32, 32, 3)
MAX_IMAGES = 1024  # per request: bounds a prediction's memory (probabilities, batches), not the request's
PREDICT_BATCH = 256  # images per forward pass
VIEW_KEYS = ("flip_tta", "tta_translate")  # the model config's keys: the evaluate params of the same names


def view_config(flip_tta: bool = False, tta_translate: int = 0) -> dict:
    """The model config that sets the test-time views (see `ImageClassifier.probabilities`)."""
    if isinstance(tta_translate, bool) or not isinstance(tta_translate, int) or not 0 <= tta_translate < 16:
        raise ValueError(f"tta_translate must be a whole number of pixels from 0 to 15, got {tta_translate!r}")
    return {"flip_tta": bool(flip_tta), "tta_translate": tta_translate}


def views_per_image(config: dict) -> int:
    """How many forward passes each image costs with these views (1 without test-time augmentation)."""
    return (2 if config["flip_tta"] else 1) * (3 if config["tta_translate"] else 1)


def checked_pixels(images: object) -> np.ndarray:
    """`images` as a uint8 array of shape (n, 32, 32, 3); MlflowException (HTTP 400) with a short
    message, never the data, when it is anything else."""
    if isinstance(images, pd.DataFrame):
        raise _invalid("expected an array of images of shape (n, 32, 32, 3), got a table")
    array = np.asarray(images)
    if array.ndim != 4 or array.shape[1:] != IMAGE_SHAPE:
        raise _invalid(f"expected images of shape (n, 32, 32, 3), got shape {array.shape}")
    if not 1 <= len(array) <= MAX_IMAGES:
        raise _invalid(f"expected 1 to {MAX_IMAGES} images per request, got {len(array)}")
    if array.dtype == np.uint8:
        return array
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise _invalid(f"expected pixels as numbers from 0 to 255, got {array.dtype}")
    if not np.all(np.isfinite(array)) or array.min() < 0 or array.max() > 255:
        raise _invalid("expected pixels from 0 to 255, got values outside that range (or NaN)")
    return np.rint(array).astype(np.uint8)


def _invalid(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


class ImageClassifier(mlflow.pyfunc.PythonModel):
    """AlexNet8 on raw pixels, with its test-time views, answering with class names."""

    @classmethod
    def assembled(cls, network, class_names: list[str], config: dict) -> ImageClassifier:
        """The classifier MLflow would load, from a network and class names already in memory."""
        classifier = cls()
        classifier.network, classifier.class_names = network, list(class_names)
        classifier.views = view_config(**{key: config.get(key, 0) for key in VIEW_KEYS})
        return classifier

    def load_context(self, context):
        import keras

        # The scoring server puts the input's repr into its error messages: keep that to a line.
        np.set_printoptions(threshold=8, edgeitems=1)
        self.network = keras.models.load_model(context.artifacts["keras_model"], safe_mode=True)
        with open(context.artifacts["dataset"], encoding="utf-8") as stream:
            self.class_names = json.load(stream)["class_names"]
        config = context.model_config or {}
        self.views = view_config(**{key: config[key] for key in VIEW_KEYS if key in config})

    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        """Class probabilities of uint8 images (n, 32, 32, 3), averaged over the test-time views,
        PREDICT_BATCH images per forward pass.

        With `flip_tta`, each view's are the mean of its own and its mirror image's. With
        `tta_translate`, the image shifted that many pixels up-left and down-right (reflect-padded)
        are two more views, weighted 1/4 each against 1/2 for the unshifted image, as airbench's
        test-time augmentation (Jordan, 2024).
        """
        return np.concatenate(
            [
                self._batch_probabilities(pixels[start : start + PREDICT_BATCH])
                for start in range(0, len(pixels), PREDICT_BATCH)
            ]
        ).astype(np.float64)

    def _batch_probabilities(self, images: np.ndarray) -> np.ndarray:
        def view_probabilities(view):
            probabilities = np.asarray(self.network.predict_on_batch(view))
            if self.views["flip_tta"]:
                probabilities = (probabilities + np.asarray(self.network.predict_on_batch(view[:, :, ::-1]))) / 2
            return probabilities

        probabilities = view_probabilities(images)
        shift = self.views["tta_translate"]
        if shift:
            size = images.shape[1]
            padded = np.pad(images, [(0, 0), (shift, shift), (shift, shift), (0, 0)], mode="reflect")
            shifted = (padded[:, :size, :size], padded[:, 2 * shift :, 2 * shift :])
            probabilities = probabilities / 2 + sum(view_probabilities(view) for view in shifted) / 4
        return probabilities

    def predict(self, context, model_input: np.ndarray, params=None) -> pd.DataFrame:
        probabilities = self.probabilities(checked_pixels(model_input))
        table = pd.DataFrame(probabilities, columns=self.class_names)
        table.insert(0, "class", np.asarray(self.class_names)[probabilities.argmax(axis=1)])
        return table


mlflow.models.set_model(ImageClassifier())
