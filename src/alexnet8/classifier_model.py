"""The model as MLflow logs and serves it: raw RGB pixels in, class names and probabilities out.

Reads (when MLflow loads the model): the artifacts logged with it, `keras_model` (the trained
`.keras` file, which normalizes pixels itself) and `dataset` (dataset.json: the class names).
Writes: nothing.

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
    """AlexNet8 on raw pixels, answering with class names."""

    def load_context(self, context):
        import keras

        # The scoring server puts the input's repr into its error messages: keep that to a line.
        np.set_printoptions(threshold=8, edgeitems=1)
        self.network = keras.models.load_model(context.artifacts["keras_model"], safe_mode=True)
        with open(context.artifacts["dataset"], encoding="utf-8") as stream:
            self.class_names = json.load(stream)["class_names"]

    def predict(self, context, model_input: np.ndarray, params=None) -> pd.DataFrame:
        pixels = checked_pixels(model_input)
        probabilities = np.concatenate(
            [
                np.asarray(self.network.predict_on_batch(pixels[start : start + PREDICT_BATCH]))
                for start in range(0, len(pixels), PREDICT_BATCH)
            ]
        ).astype(np.float64)
        table = pd.DataFrame(probabilities, columns=self.class_names)
        table.insert(0, "class", np.asarray(self.class_names)[probabilities.argmax(axis=1)])
        return table


mlflow.models.set_model(ImageClassifier())
