"""The served model: the classifier the evaluate stage scores, logged to MLflow and registered,
and the record file that names it.

Reads: the trained `.keras` model and dataset.json (logged as the model's artifacts); the record
file (`--served-model` in dvc.yaml, JSON) for `predict`.
Writes: into the active MLflow run (the evaluation's), the model registry, and the record file.

The logged model is classifier_model.py with the `.keras` file, dataset.json and, as its model
config, the test-time views it was scored with: what evaluate measured is what a user loading
`models:/<name>@champion`, `mlflow models serve` or `python -m alexnet8.predict` gets.
"""

from __future__ import annotations

import re
from pathlib import Path

import keras
import mlflow
import numpy as np
import tensorflow as tf
from mlflow.models import ModelSignature
from mlflow.types.schema import ColSpec, Schema, TensorSpec
from pydantic import BaseModel, ConfigDict, ValidationError

from alexnet8 import classifier_model
from alexnet8.errors import DataError
from alexnet8.files import write_json

PIP_REQUIREMENTS = [
    f"keras=={keras.__version__}",
    f"tensorflow=={tf.__version__}",
    f"numpy=={np.__version__}",
]


class ServedModelRecord(BaseModel):
    """What the evaluate stage logged: its run, the logged model, the views, the registered version."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    run_id: str  # the evaluation's MLflow run (a child of the training run)
    training_run_id: str
    model_id: str
    model_uri: str  # models:/<model id>
    views: dict[str, bool | int]  # classifier_model.view_config
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
    """uint8 RGB pixels (n, 32, 32, 3) in; the class name and each class's probability out."""
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, *classifier_model.IMAGE_SHAPE))]),
        outputs=Schema([ColSpec("string", "class"), *(ColSpec("double", name) for name in class_names)]),
    )


def version_description(class_names: list[str], views: dict, test_summary: str) -> str:
    """The registry's description of a version: what it takes, what it answers, how it was scored."""
    passes = classifier_model.views_per_image(views)
    view_text = (
        f"Each image is predicted in {passes} views (flip_tta={views['flip_tta']}, "
        f"tta_translate={views['tta_translate']}) and their probabilities averaged"
        if passes > 1
        else "One view per image (no test-time augmentation)"
    )
    return (
        "AlexNet8 trained on CIFAR-10. Input: uint8 RGB pixels 0-255, shape (n, 32, 32, 3), "
        f'1 to {classifier_model.MAX_IMAGES} images per request (JSON: {{"inputs": [image, ...]}}). '
        f"Output: one row per image, `class` (the most probable of {', '.join(class_names)}) and each class's "
        f"probability. {view_text}. Scored as served: {test_summary}."
    )


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
    """Log the trained model as an MLflow model that takes raw pixels and answers with class names
    (classifier_model.py), with `views` as its model config and `params` as the logged model's
    params; with `registered_model_name`, also as a new version of that registered model."""
    return mlflow.pyfunc.log_model(
        name=re.sub(r"[/:.%\"']", "_", name),  # characters MLflow refuses in model names
        python_model=Path(classifier_model.__file__),
        artifacts={"keras_model": str(model_path), "dataset": str(dataset_file)},
        model_config=views,
        signature=classifier_signature(class_names),
        input_example=np.asarray(example_images[:2]),
        pip_requirements=PIP_REQUIREMENTS,
        registered_model_name=registered_model_name,
        params={key: str(value) for key, value in params.items()},
    )
