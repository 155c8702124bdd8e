"""The served model: the classifier the evaluate stage scores, logged to MLflow and registered,
and the record file that names it.

Reads: the trained `.keras` model and dataset.json (logged as the model's artifacts); the record
file (`--served-model` in dvc.yaml, JSON) for `predict`.
Writes: into the active MLflow run (the evaluation's), the model registry, and the record file.

The logged model is image_classifier.py with the `.keras` file, dataset.json and, as its model
config, the test-time views it was scored with: what evaluate measured is what a user loading
`models:/<name>@champion`, `mlflow models serve` or `python -m alexnet8.predict` gets.
"""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import keras
import mlflow
import numpy as np
import PIL
import tensorflow as tf
from mlflow.models import ModelSignature
from mlflow.types.schema import ColSpec, Schema
from PIL import Image
from pydantic import BaseModel, ConfigDict, ValidationError

from alexnet8 import image_classifier
from alexnet8.errors import DataError
from alexnet8.files import write_json

PIP_REQUIREMENTS = [
    f"keras=={keras.__version__}",
    f"tensorflow=={tf.__version__}",
    f"numpy=={np.__version__}",
    f"pillow=={PIL.__version__}",  # image_classifier.decode_image
]


class ServedModelRecord(BaseModel):
    """What the evaluate stage logged: its run, the logged model, the views, the registered version."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    run_id: str  # the evaluation's MLflow run (a child of the training run)
    training_run_id: str
    model_id: str
    model_uri: str  # models:/<model id>
    views: dict[str, bool | int]  # image_classifier.view_config
    registered_model: str | None = None
    version: str | None = None


def write_record(path: str | Path, record: ServedModelRecord) -> None:
    write_json(path, record.model_dump())


def read_record(path: str | Path) -> ServedModelRecord:
    """The record the evaluate stage wrote; DataError naming the file when it is missing or wrong."""
    path = Path(path)
    try:
        return ServedModelRecord.model_validate_json(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path} not found: run the evaluate stage first (it assembles the served model)") from None
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, item['loc'])) or 'file'}: {item['msg']}" for item in error.errors())
        raise DataError(f"{path}: not a record written by the evaluate stage ({problems})") from None


def classifier_signature(class_names: list[str]) -> ModelSignature:
    """The class name and each class's probability out; no input schema.

    MLflow applies an input schema twice: its server parses the JSON with it, and `predict` checks
    the input against it in every process. One schema can not take both forms: a uint8 tensor
    refuses strings, and a string column refuses a NumPy array in-process. It would cost time too:
    with a tensor schema the server deep-copies the parsed JSON before casting it, 1.8 s of a 256-image
    request here. Without one, the server hands the parsed JSON on as arrays and image_classifier.py
    checks them; the version description and the input example show the forms.
    """
    return ModelSignature(
        inputs=None,
        outputs=Schema([ColSpec("string", "class"), *(ColSpec("double", name) for name in class_names)]),
    )


def version_description(class_names: list[str], views: dict, test_summary: str) -> str:
    """The registry's description of a version: what it takes, what it answers, how it was scored."""
    passes = image_classifier.views_per_image(views)
    view_text = (
        f"Each image is predicted in {passes} views (flip_tta={views['flip_tta']}, "
        f"tta_translate={views['tta_translate']}) and their probabilities averaged"
        if passes > 1
        else "One view per image (no test-time augmentation)"
    )
    return (
        "AlexNet8 trained on CIFAR-10. Input, 1 to "
        f"{image_classifier.MAX_IMAGES} images per request, as image files (JPEG, PNG, WebP..., any size "
        'and mode) in base64, {"inputs": ["/9j/4AAQ...", ...]}, each turned upright (EXIF), made RGB '
        "(transparency on white), center-cropped and resized to 32 x 32; or as uint8 RGB pixels 0-255, "
        'shape (n, 32, 32, 3): {"inputs": [image, ...]}, or compactly {"inputs": {"pixels": [base64 of '
        "each image's 3072 bytes, ...]}}. Output: one row per image, `class` (the most probable of "
        f"{', '.join(class_names)}) and each class's probability. {view_text}. Scored as served: {test_summary}."
    )


def example_files(images: np.ndarray) -> list[str]:
    """`images` (n, 32, 32, 3) as the base64 PNG files the served model takes: its input example."""
    encoded = []
    for pixels in images:
        buffer = io.BytesIO()
        Image.fromarray(np.asarray(pixels, dtype=np.uint8)).save(buffer, format="PNG")
        encoded.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
    return encoded


def log_classifier(
    model_path: str | Path,
    dataset_file: str | Path,
    class_names: list[str],
    views: dict,
    example_images: np.ndarray,
    name: str,
    params: dict[str, object],
    registered_model_name: str | None = None,
) -> mlflow.models.model.ModelInfo:
    """Log the trained model as an MLflow model that takes images (files or pixels) and answers
    with class names (image_classifier.py): `example_images` as its input example (PNG files),
    `views` as its model config, `params` as the logged model's params; with
    `registered_model_name`, also as a new version of that registered model."""
    return mlflow.pyfunc.log_model(
        name=re.sub(r"[/:.%\"']", "_", name),  # characters MLflow refuses in model names
        python_model=Path(image_classifier.__file__),
        artifacts={"keras_model": str(model_path), "dataset": str(dataset_file)},
        model_config=views,
        signature=classifier_signature(class_names),
        input_example=example_files(example_images[:2]),
        pip_requirements=PIP_REQUIREMENTS,
        registered_model_name=registered_model_name,
        params={key: str(value) for key, value in params.items()},
    )
