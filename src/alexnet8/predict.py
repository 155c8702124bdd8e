"""Command `predict`: the trained model's class for each of your own image files.

Reads: the image files (anything Pillow opens: PNG, JPEG, GIF, BMP, TIFF, WebP...); the model,
by default the workspace's served model: `--model` (models/model.keras) with the class names of
`--data` (data/prepared/dataset.json) and the test-time views of `--served-model`
(models/served_model.json, the evaluate stage's record), or with `--model-uri` any MLflow model
URI of the logged classifier (`models:/alexnet8-cifar10@champion`, `models:/m-...`).
Writes: one line per image to stdout (file, class, its probability); with `--out`, a CSV
(file, class, probability, then each class's probability), atomically. Files that can not be
read are logged by name and the others still predicted; the exit status is then 1.

How a file becomes the model's 32 x 32 RGB input, in this order:
1. It is decoded completely (a truncated file fails here, not later), its first frame if animated,
   and turned upright as its EXIF orientation says (photos from phones). A JPEG is decoded at 1/2
   to 1/8 scale while both sides stay at least 32 pixels (faster; within 1 level of a full decode).
   An image of more than 178,956,970 pixels (Pillow's decompression-bomb limit, twice
   Image.MAX_IMAGE_PIXELS) is refused as too large.
2. Converted to 8-bit RGB: grayscale and palette images by repeating or looking up the colour;
   16-bit and 32-bit integer grayscale (I;16, I) by scaling 0-65535 to 0-255; CMYK by Pillow's
   conversion (no colour profile is applied); transparent pixels (RGBA, LA, PA, palette with
   transparency) composited on white, and said so in the log.
3. Center-cropped to a square of the short side: CIFAR-10 images are square whole scenes, and
   cropping keeps the proportions that stretching would distort (a 4:3 photo loses 1/8 of its
   width on each side).
4. Resized to 32 x 32 by averaging the source pixels under each target pixel (Pillow's BOX
   filter: no aliasing, no ringing), or with BICUBIC for the rare image smaller than 32 pixels.
   A 32 x 32 RGB file is used as it is, pixel for pixel.
The served model decodes the image files sent to it with this same code (image_classifier.py).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from alexnet8 import cli
from alexnet8.dataset import DATASET_FILE, load_description
from alexnet8.errors import DataError
from alexnet8.files import atomic_path
from alexnet8.progress import progress_bar

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "models/model.keras"
DEFAULT_DATA = "data/prepared"
DEFAULT_SERVED_MODEL = "models/served_model.json"  # the evaluate stage's record: the views it scored with
BATCH_SIZE = 256  # images per forward pass: a thousand files never sit in memory at full size

# The pixels of `n` images (n x 32 x 32 x 3 uint8) -> one row per image: the column `class`
# and one probability column per class name, as the logged MLflow model answers.
Classifier = Callable[[np.ndarray], pd.DataFrame]


class UnreadableImage(DataError):
    """One input file is missing, not an image, or corrupt; the message names it."""


def read_image(path: str | Path) -> tuple[np.ndarray, bool]:
    """The model's input for one image file (see the module docstring), and whether transparent
    pixels were composited on white; UnreadableImage naming the file if it can not be.

    Decoded by the served model's own code (image_classifier.decode_image): the server, given the
    same file, predicts the same pixels."""
    from alexnet8.image_classifier import ImageError, decode_image  # imports MLflow: not for --help

    path = Path(path)
    try:
        return decode_image(path.read_bytes())
    except FileNotFoundError:
        raise UnreadableImage(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UnreadableImage(f"{path}: is a directory, not an image file") from None
    except PermissionError:
        raise UnreadableImage(f"{path}: permission denied") from None
    except (ImageError, OSError) as error:
        raise UnreadableImage(f"{path}: {error}") from None


def predict_files(
    paths: Sequence[str], classify: Classifier, batch_size: int = BATCH_SIZE
) -> tuple[pd.DataFrame, list[str]]:
    """One row per readable file, in order: `file`, `class`, `probability` (of that class), then
    each class's probability; and the messages of the files that could not be read (logged too).

    Files are read and predicted `batch_size` at a time, so memory does not grow with their number.
    """
    tables, failures, composited = [], [], []
    # A bar (or a log line every 10%) only when there is more than one batch to wait for.
    many = len(paths) > batch_size
    with progress_bar(len(paths), "predicting", "files") if many else contextlib.nullcontext() as progress:
        for start in range(0, len(paths), batch_size):
            files, pixels = [], []
            for path in paths[start : start + batch_size]:
                try:
                    image_pixels, was_composited = read_image(path)
                except UnreadableImage as error:
                    logger.error("%s", error)
                    failures.append(str(error))
                    continue
                files.append(str(path))
                pixels.append(image_pixels)
                if was_composited:
                    composited.append(str(path))
            if files:
                tables.append(_with_files(classify(np.stack(pixels)), files))
            if progress is not None:
                progress.update(len(paths[start : start + batch_size]))
    if composited:
        shown = ", ".join(composited[:5]) + (", ..." if len(composited) > 5 else "")
        logger.info("%d image(s) had transparent pixels, composited on white: %s", len(composited), shown)
    table = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=["file", "class", "probability"])
    return table, failures


def _with_files(table: pd.DataFrame, files: list[str]) -> pd.DataFrame:
    """A classifier's answer with the file names first and the predicted class's probability third."""
    if not isinstance(table, pd.DataFrame) or "class" not in table.columns or len(table) != len(files):
        raise DataError(
            "the model did not answer with a table of one row per image holding a `class` column and one "
            "probability column per class: is it the alexnet8 classifier logged by the train stage?"
        )
    class_names = [name for name in table.columns if name != "class"]
    probabilities = table[class_names].to_numpy(dtype=np.float64)
    chosen = probabilities[np.arange(len(table)), [class_names.index(name) for name in table["class"]]]
    return pd.concat(
        [pd.DataFrame({"file": files, "class": table["class"].to_numpy(), "probability": chosen}), table[class_names]],
        axis=1,
    )


def format_table(table: pd.DataFrame) -> str:
    """The predictions as aligned text: file, class, probability of that class (4 decimals)."""
    file_width = max([len("file"), *(len(name) for name in table["file"])])
    class_width = max([len("class"), *(len(name) for name in table["class"])])
    lines = [f"{'file':<{file_width}}  {'class':<{class_width}}  probability"]
    lines += [
        f"{file:<{file_width}}  {name:<{class_width}}  {probability:>11.4f}"
        for file, name, probability in zip(table["file"], table["class"], table["probability"], strict=True)
    ]
    return "\n".join(lines) + "\n"


def write_predictions_csv(path: str | Path, table: pd.DataFrame) -> None:
    """The predictions as CSV (file, class, probability, each class's probability), atomically."""
    with atomic_path(path) as temporary, open(temporary, "w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(table.columns)
        # repr of each float: the probabilities as computed, to the last digit
        writer.writerows(
            [value if isinstance(value, str) else repr(float(value)) for value in row]
            for row in table.itertuples(index=False)
        )


def workspace_classifier(
    model_path: str | Path, prepared_dir: str | Path, served_record: str | Path | None = None
) -> Classifier:
    """The trained `.keras` model with dataset.json's class names and the test-time views the
    evaluate stage recorded in `served_record`, answering as the logged MLflow model does: it is
    the same code (image_classifier.ImageClassifier). Without the record, one view per image."""
    from alexnet8 import image_classifier
    from alexnet8.served_model import read_record

    class_names = load_description(prepared_dir).class_names
    model_path = Path(model_path)
    if not model_path.is_file():
        raise DataError(f"{model_path} not found: run the train stage first, or name a model with --model-uri")
    if served_record is not None and Path(served_record).exists():
        views = read_record(served_record).views
    else:
        views = image_classifier.view_config()
        logger.info("no %s: one view per image (run the evaluate stage for the served model's views)", served_record)
    try:
        network = keras_model(model_path)
    except (ValueError, OSError) as error:
        raise DataError(
            f"{model_path}: cannot load the model (Keras safe mode refuses code in model files): {error}"
        ) from None
    outputs = network.output_shape[-1]
    if outputs != len(class_names):
        raise DataError(
            f"{model_path} has {outputs} outputs but {Path(prepared_dir) / DATASET_FILE} names "
            f"{len(class_names)} classes: the model was not trained on this data"
        )
    classifier = image_classifier.ImageClassifier.assembled(network, class_names, views)
    return lambda pixels: classifier.predict(None, pixels)


def keras_model(path: Path):
    """The `.keras` file, loaded as the logged model loads it (safe mode)."""
    import keras

    return keras.models.load_model(path, safe_mode=True)


def mlflow_classifier(model_uri: str) -> Classifier:
    """The MLflow model at `model_uri` (the logged classifier: it answers with class and probabilities)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        model = mlflow.pyfunc.load_model(model_uri)
    except (MlflowException, OSError) as error:
        raise DataError(f"{model_uri}: cannot load the MLflow model: {error}") from None
    return model.predict


def main(argv: Sequence[str] | None = None) -> None:
    argument_parser = cli.parser(__doc__.splitlines()[0], reads_params=False)
    argument_parser.formatter_class = argparse.RawDescriptionHelpFormatter
    argument_parser.epilog = (
        "Each image is decoded, turned upright (EXIF), converted to 8-bit RGB (16-bit grayscale scaled,\n"
        "transparent pixels composited on white), center-cropped to a square of its short side and\n"
        "resized to 32 x 32 with Pillow's BOX filter (the mean of the pixels each target pixel covers;\n"
        "BICUBIC if the image is smaller). A 32 x 32 RGB image is used as it is.\n"
        "Exit status 1 if any file could not be read (each is named in the log; the others are predicted)."
    )
    argument_parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, ...)")
    argument_parser.add_argument(
        "--model", help=f"trained model (.keras) from the train stage (default: {DEFAULT_MODEL})"
    )
    argument_parser.add_argument(
        "--data", help=f"prepared dataset folder whose {DATASET_FILE} names the classes (default: {DEFAULT_DATA})"
    )
    argument_parser.add_argument(
        "--model-uri",
        help="an MLflow model URI instead of --model/--data, e.g. models:/alexnet8-cifar10@champion, "
        "runs:/<run id>/<model name>, models:/<model id> (uses MLFLOW_TRACKING_URI; empty: --model/--data)",
    )
    argument_parser.add_argument(
        "--served-model",
        help="the evaluate stage's record, whose test-time views the workspace model uses "
        f"(default: {DEFAULT_SERVED_MODEL} when --model is not given; none: one view per image)",
    )
    argument_parser.add_argument("--out", help="also write the predictions to this CSV file")
    argument_parser.add_argument(
        "--batch-size", type=int, default=BATCH_SIZE, help=f"images per forward pass (default: {BATCH_SIZE})"
    )
    arguments = argument_parser.parse_args(argv)
    if arguments.model_uri and (arguments.model or arguments.data or arguments.served_model):
        argument_parser.error("--model-uri replaces --model, --data and --served-model: give one or the other")
    if arguments.batch_size < 1:
        argument_parser.error("--batch-size must be at least 1")

    if arguments.model_uri:
        classify, source = mlflow_classifier(arguments.model_uri), arguments.model_uri
    else:
        model_path = arguments.model or DEFAULT_MODEL
        record = arguments.served_model or (None if arguments.model else DEFAULT_SERVED_MODEL)
        classify, source = workspace_classifier(model_path, arguments.data or DEFAULT_DATA, record), model_path
    table, failures = predict_files(arguments.images, classify, arguments.batch_size)
    if table.empty:
        raise DataError(f"none of the {len(arguments.images)} file(s) could be read as an image (see above)")

    print(format_table(table), end="", flush=True)
    if arguments.out:
        write_predictions_csv(arguments.out, table)
    logger.info(
        "predicted %d image(s) with %s%s", len(table), source, f"; wrote {arguments.out}" if arguments.out else ""
    )
    if failures:
        raise DataError(f"{len(failures)} of {len(arguments.images)} file(s) could not be read (see above)")


if __name__ == "__main__":
    cli.run(main)
