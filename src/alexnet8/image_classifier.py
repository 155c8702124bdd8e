"""The model as MLflow logs and serves it: images in (pixels or image files), class names and
probabilities out.

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
model's requirements name (MLflow, Keras, TensorFlow, NumPy, pandas, Pillow). `python -m
alexnet8.predict` decodes files with this file's `decode_image`: a file given to the command and
the same file sent to the server become the same pixels.

Input: images in one of three forms (over HTTP, the `inputs` of the JSON body):
- pixels: uint8 (or whole-number 0-255) RGB of shape (n, 32, 32, 3); over HTTP, nested lists
  of numbers, `{"inputs": [image, ...]}`;
- image files (JPEG, PNG, WebP, anything Pillow reads; any size and mode): base64 strings,
  `{"inputs": ["/9j/4AAQ...", ...]}`, in-process also `bytes`; a one-column table of them
  (`dataframe_split`) too. Each becomes 32 x 32 RGB by `decode_image`;
- raw pixels, compactly: `{"inputs": {"pixels": [...]}}`, each the base64 of one image's 3,072
  bytes (uint8 RGB, row by row: `base64.b64encode(image.tobytes())`).
Output: one row per image, the column `class` (the most probable class name) and one column per
class name holding its probability; over HTTP `{"predictions": [{"class": "cat", "airplane":
0.01, ...}, ...]}`.

The logged model has no input schema (served_model.py says why), so MLflow's server passes the
parsed JSON on as NumPy arrays and the checks are here: a bad request gets HTTP 400 with a short
message naming the bad items (`inputs[2]: not an image file Pillow can read`).

In `mlflow models serve` (recognised by MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT in the environment,
which it sets to its request timeout): at most MAX_IMAGES images per request, and a prediction
gives up once that timeout has passed since it began (waiting its turn, between images being
decoded, between batches): by then the server has answered 504, so the rest would be work nobody
receives. In-process, any number of images and no deadline. Either way one prediction runs at a
time per loaded model: two at once on the same cores only compete and hold twice the memory.

MLflow's error messages embed the input's repr, so `load_context` makes NumPy print large arrays
in a few short lines and long strings cut short (`'iVBORw0KGgoAAAANS...'`): process-wide, in any
process that loads this model.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
import re
import threading
import time

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import DEADLINE_EXCEEDED, INVALID_PARAMETER_VALUE
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SHAPE = (32, 32, 3)
SIDE = IMAGE_SHAPE[0]
PIXEL_BYTES = SIDE * SIDE * 3  # one image as raw uint8 RGB
PIXELS_KEY = "pixels"  # {"inputs": {"pixels": [...]}}: raw pixels, base64
MAX_IMAGES = 1024  # per request, when served: bounds a request's decoding and prediction memory
PREDICT_BATCH = 256  # images per forward pass
VIEW_KEYS = ("flip_tta", "tta_translate")  # the model config's keys: the evaluate params of the same names
TIMEOUT_VARIABLE = "MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT"  # set by `mlflow models serve`: its timeout, seconds
BACKGROUND = (255, 255, 255)  # what transparent pixels show: white, as a browser or viewer shows them
SIXTEEN_BIT_MAX = 65535
SHOWN_PROBLEMS = 5  # bad items named in one error message
# The NumPy versions `load_context`'s process-wide print options were checked on: the fence
# library_patches.NUMPY_PRINT_OPTIONS, repeated here since this file imports nothing of the package
# (tests/test_library_patches.py keeps the two equal).
NUMPY_CHECKED = ">=2.4.6,<2.6"


class ImageError(ValueError):
    """Bytes that can not become the model's input; the message says why (the caller names the item)."""


def view_config(flip_tta: bool = False, tta_translate: int = 0) -> dict:
    """The model config that sets the test-time views (see `ImageClassifier.probabilities`)."""
    if isinstance(tta_translate, bool) or not isinstance(tta_translate, int) or not 0 <= tta_translate < 16:
        raise ValueError(f"tta_translate must be a whole number of pixels from 0 to 15, got {tta_translate!r}")
    return {"flip_tta": bool(flip_tta), "tta_translate": tta_translate}


def views_per_image(config: dict) -> int:
    """How many forward passes each image costs with these views (1 without test-time augmentation)."""
    return (2 if config["flip_tta"] else 1) * (3 if config["tta_translate"] else 1)


# --- image files -> pixels --------------------------------------------------------------------


def rgb_image(image: Image.Image) -> tuple[Image.Image, bool]:
    """`image` as 8-bit RGB, and whether it had transparent pixels (now composited on white)."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # Pillow's own conversion clips these to 0-255 (a 16-bit image turns almost white): scale.
        # 32-bit "I" is how older Pillows and some formats hold 16-bit grayscale, so it is read as 0-65535 too.
        values = np.asarray(image, dtype=np.float64)
        gray = np.rint(np.clip(values, 0, SIXTEEN_BIT_MAX) * (255 / SIXTEEN_BIT_MAX)).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB"), False
    if image.mode == "RGB":
        return image, False
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        low_alpha, _ = rgba.getchannel("A").getextrema()
        if low_alpha < 255:
            background = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
            return Image.alpha_composite(background, rgba).convert("RGB"), True
        return rgba.convert("RGB"), False  # an alpha channel, but every pixel opaque
    return image.convert("RGB"), False


def square_pixels(image: Image.Image) -> np.ndarray:
    """An RGB image -> 32 x 32 x 3 uint8 pixels: the central square of the short side, resized
    with BOX (the mean of the source pixels each target pixel covers), BICUBIC when enlarging."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    method = Image.Resampling.BOX if side >= SIDE else Image.Resampling.BICUBIC
    # At 32 x 32 the box is the whole image and Pillow returns an exact copy: pixels unchanged.
    resized = image.resize((SIDE, SIDE), method, box=(left, top, left + side, top + side))
    return np.asarray(resized, dtype=np.uint8)


def decode_image(data: bytes) -> tuple[np.ndarray, bool]:
    """An encoded image file -> the model's 32 x 32 x 3 uint8 input (first frame; turned upright as
    its EXIF orientation says; 8-bit RGB with transparent pixels on white; the central square,
    resized), and whether transparent pixels were composited; ImageError saying what is wrong."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            # A JPEG is decoded at 1/2 to 1/8 scale while both sides stay >= 32 pixels (its DCT
            # does the first averaging): a 12-megapixel photo 2.6x faster, within 1 level of a full decode.
            image.draft(None, (SIDE, SIDE))
            image.load()  # decode now: a truncated file raises here, inside the try
            rgb, composited = rgb_image(ImageOps.exif_transpose(image))
            return square_pixels(rgb), composited
    except UnidentifiedImageError:
        raise ImageError("not an image file Pillow can read") from None
    except Image.DecompressionBombError as error:
        raise ImageError(too_large(error)) from None
    except Exception as error:
        # Pillow's decoders report a corrupt or truncated file with many exception types (OSError,
        # SyntaxError, ValueError, EOFError, struct.error, zlib.error): all mean this file is bad.
        raise ImageError(f"corrupt or truncated image ({type(error).__name__}: {error})") from None


def too_large(error: Exception) -> str:
    """What Pillow's decompression-bomb guard refused, said as a size and its limit."""
    found = re.search(r"\((\d+) pixels\)", str(error))
    size = f"{int(found.group(1)):,} pixels" if found else "too many pixels"
    limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
    return (
        f"image too large: {size}, the limit is {limit:,} pixels (e.g. {int(limit**0.5):,} x {int(limit**0.5):,}; "
        "Pillow's decompression-bomb guard, twice Image.MAX_IMAGE_PIXELS)"
    )


# --- any input form -> pixels -------------------------------------------------------------------


def images_pixels(images: object, deadline: float | None = None, max_images: int | None = None) -> np.ndarray:
    """The uint8 pixels (n, 32, 32, 3) of `images` in any form the module docstring lists;
    MlflowException (HTTP 400) with a short message, never the data, when they are not images."""
    if isinstance(images, dict):
        items = _encoded_items(images.get(PIXELS_KEY)) if list(images) == [PIXELS_KEY] else None
        if items is None:
            raise _invalid(f'expected {{"{PIXELS_KEY}": [base64 of each image\'s {PIXEL_BYTES} bytes, ...]}}')
        return raw_pixels(_counted(items, max_images))
    if isinstance(images, pd.DataFrame):
        if images.shape[1] != 1:
            raise _invalid(f"expected a table of one column of base64 image files, got {images.shape[1]} columns")
        images = images.iloc[:, 0].to_numpy()
    items = _encoded_items(images)
    if items is not None:
        return encoded_pixels(_counted(items, max_images), deadline)
    return checked_pixels(images, max_images)


def checked_pixels(images: object, max_images: int | None = None) -> np.ndarray:
    """`images` as a uint8 array of shape (n, 32, 32, 3); MlflowException (HTTP 400) with a short
    message, never the data, when it is anything else."""
    try:
        array = np.asarray(images)
    except (ValueError, TypeError):
        raise _invalid("expected images of shape (n, 32, 32, 3), got lists of unequal lengths") from None
    if array.ndim >= 1:
        _counted(array, max_images)  # an empty batch is said to be empty, whatever its shape
    if array.ndim != 4 or array.shape[1:] != IMAGE_SHAPE:
        raise _invalid(f"expected images of shape (n, 32, 32, 3), got shape {array.shape}")
    if array.dtype == np.uint8:
        return array
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise _invalid(f"expected pixels as numbers from 0 to 255, got {array.dtype}")
    if not np.all(np.isfinite(array)) or array.min() < 0 or array.max() > 255:
        raise _invalid("expected pixels from 0 to 255, got values outside that range (or NaN)")
    return np.rint(array).astype(np.uint8)


def encoded_pixels(items: list, deadline: float | None = None) -> np.ndarray:
    """Image files (bytes, or base64 text) -> their pixels, by `decode_image`; MlflowException
    (HTTP 400) naming every item that is not an image."""
    pixels, problems = [], []
    for index, item in enumerate(items):
        _check_deadline(deadline)
        try:
            pixels.append(decode_image(item if isinstance(item, bytes) else _unbase64(item))[0])
        except ImageError as error:
            problems.append(f"inputs[{index}]: {error}")
    if problems:
        raise _invalid(_problems(problems, len(items)))
    return np.stack(pixels)


def raw_pixels(items: list) -> np.ndarray:
    """Each image's 3,072 raw bytes (bytes, or base64 text) -> (n, 32, 32, 3) uint8;
    MlflowException (HTTP 400) naming every item of another length or not base64."""
    buffers, problems = [], []
    for index, item in enumerate(items):
        try:
            data = item if isinstance(item, bytes) else _unbase64(item)
        except ImageError as error:
            problems.append(f"inputs.{PIXELS_KEY}[{index}]: {error}")
            continue
        if len(data) != PIXEL_BYTES:
            problems.append(f"inputs.{PIXELS_KEY}[{index}]: {len(data)} bytes, not {PIXEL_BYTES} (32 x 32 x 3 uint8)")
        buffers.append(data)
    if problems:
        raise _invalid(_problems(problems, len(items)))
    return np.frombuffer(b"".join(buffers), dtype=np.uint8).reshape(len(items), *IMAGE_SHAPE)


def _encoded_items(images: object) -> list | None:
    """The items of a batch of encoded images (str: base64, bytes: as they are), or None if it is not one."""
    if isinstance(images, np.ndarray):
        if images.ndim != 1 or images.dtype.kind not in "USO":
            return None
    elif not isinstance(images, list | tuple):
        return None
    items = list(images)
    return items if items and all(isinstance(item, str | bytes) for item in items) else None


def _unbase64(text: str) -> bytes:
    try:
        return base64.b64decode("".join(text.split()), validate=True)  # line breaks (`base64` wraps) are fine
    except (binascii.Error, ValueError) as error:
        raise ImageError(f"not base64 text ({error}): send each file's bytes base64-encoded") from None


def _counted(images, max_images: int | None):
    if len(images) < 1 or (max_images is not None and len(images) > max_images):
        raise _invalid(f"expected 1 to {max_images or 'any number of'} images per request, got {len(images)}")
    return images


def _problems(problems: list[str], count: int) -> str:
    shown = "; ".join(problems[:SHOWN_PROBLEMS]) + ("; ..." if len(problems) > SHOWN_PROBLEMS else "")
    return f"{len(problems)} of {count} images can not be read: {shown}"


def _invalid(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def _check_deadline(deadline: float | None) -> None:
    if deadline is not None and time.monotonic() > deadline:
        raise _too_late()


def _too_late() -> MlflowException:
    return MlflowException(
        f"not finished within the server's request timeout ({TIMEOUT_VARIABLE}, `mlflow models serve "
        "--timeout`): the server has answered 504, so the prediction stopped",
        error_code=DEADLINE_EXCEEDED,
    )


def _short(value: object) -> str:
    """An array element as NumPy prints it in error messages: long strings cut short."""
    if isinstance(value, str):
        value = str(value)  # np.str_ -> str: printed without "np.str_(...)"
    elif isinstance(value, bytes):
        value = bytes(value)
    text = repr(value)
    return text if len(text) <= 24 else text[:20] + "..."


def check_numpy_version(version: str = np.__version__) -> None:
    """Raise RuntimeError unless NumPy `version` is one the print options were checked on (NUMPY_CHECKED)."""
    from packaging.specifiers import SpecifierSet

    if not SpecifierSet(NUMPY_CHECKED).contains(version, prereleases=True):
        raise RuntimeError(
            f"numpy {version} is installed, but the model sets NumPy's print options process-wide "
            f"(ImageClassifier.load_context) and was checked on numpy{NUMPY_CHECKED} only: serve it "
            "in an environment with its logged requirements"
        )


def server_timeout() -> float | None:
    """The request timeout of the `mlflow models serve` this process is (seconds), or None in-process."""
    try:
        return float(os.environ[TIMEOUT_VARIABLE])
    except (KeyError, ValueError):
        return None


class ImageClassifier(mlflow.pyfunc.PythonModel):
    """AlexNet8 on raw pixels, with its test-time views, answering with class names."""

    def __init__(self):
        self.turn = threading.Lock()  # one prediction at a time (see the module docstring)

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
        check_numpy_version()
        np.set_printoptions(threshold=8, edgeitems=1, formatter={"numpystr": _short, "object": _short})
        self.network = keras.models.load_model(context.artifacts["keras_model"], safe_mode=True)
        with open(context.artifacts["dataset"], encoding="utf-8") as stream:
            self.class_names = json.load(stream)["class_names"]
        config = context.model_config or {}
        self.views = view_config(**{key: config[key] for key in VIEW_KEYS if key in config})

    def probabilities(self, pixels: np.ndarray, deadline: float | None = None) -> np.ndarray:
        """Class probabilities of uint8 images (n, 32, 32, 3), averaged over the test-time views,
        PREDICT_BATCH images per forward pass (MlflowException once `deadline`, a
        `time.monotonic()`, has passed).

        With `flip_tta`, each view's are the mean of its own and its mirror image's. With
        `tta_translate`, the image shifted that many pixels up-left and down-right (reflect-padded)
        are two more views, weighted 1/4 each against 1/2 for the unshifted image, as airbench's
        test-time augmentation (Jordan, 2024).
        """
        batches = []
        for start in range(0, len(pixels), PREDICT_BATCH):
            _check_deadline(deadline)
            batches.append(self._batch_probabilities(pixels[start : start + PREDICT_BATCH]))
        return np.concatenate(batches).astype(np.float64)

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

    # np.ndarray: what MLflow's server passes (or a dict or table of arrays), and a hint MLflow infers no schema from
    def predict(self, context, model_input: np.ndarray, params=None) -> pd.DataFrame:
        timeout = server_timeout()
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self.turn.acquire(timeout=-1 if timeout is None else timeout):
            raise _too_late()
        try:
            pixels = images_pixels(model_input, deadline, None if timeout is None else MAX_IMAGES)
            probabilities = self.probabilities(pixels, deadline)
        finally:
            self.turn.release()
        table = pd.DataFrame(probabilities, columns=self.class_names)
        table.insert(0, "class", np.asarray(self.class_names)[probabilities.argmax(axis=1)])
        return table


mlflow.models.set_model(ImageClassifier())
