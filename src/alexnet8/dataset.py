"""The prepared dataset's file layout, and loading it for training and evaluation.

Reads: the folder written by the preprocess stage (`<split>_images.npy`, `<split>_labels.npy`,
dataset.json). Writes: nothing.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from alexnet8.errors import DataError, validation_problems
from alexnet8.files import file_md5

SPLITS = ("train", "validation", "test")
IMAGE_SHAPE = (32, 32, 3)  # CIFAR-10: height, width, RGB
DATASET_FILE = "dataset.json"


def image_file(split: str) -> str:
    return f"{split}_images.npy"


def label_file(split: str) -> str:
    return f"{split}_labels.npy"


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8 RGB pixels, N x 32 x 32 x 3, memory-mapped read-only
    labels: np.ndarray  # uint8, N
    images_path: Path | None = None  # the .npy file `images` maps, if any: ImageReader reads batches from it


class ImageReader:
    """Reads the images at given indices of a split, batch by batch.

    From a split loaded by load_split it reads the rows straight from the .npy file (pread), so
    the training set lives in the page cache, not in the process: neither a copy nor touched
    memory-mapped pages count towards its resident memory. Otherwise it indexes the array.
    """

    def __init__(self, split: Split):
        self.images = split.images
        self.row_bytes = int(np.prod(split.images.shape[1:])) * split.images.itemsize
        self.path = split.images_path
        self.file = os.open(self.path, os.O_RDONLY) if self.path is not None else None

    def __call__(self, index: np.ndarray) -> np.ndarray:
        if self.file is None:
            return np.take(self.images, index, axis=0)
        batch = np.empty((len(index), *self.images.shape[1:]), self.images.dtype)
        rows = batch.reshape(len(index), -1).view(np.uint8)
        for position, row in enumerate(index):
            if not 0 <= row < len(self.images):
                raise IndexError(f"image {row} out of range for {self.path} ({len(self.images)} images)")
            if os.preadv(self.file, [rows[position]], self.images.offset + int(row) * self.row_bytes) != self.row_bytes:
                raise DataError(f"{self.path} is shorter than its header says: re-run the preprocess stage")
        return batch

    def __del__(self):
        if getattr(self, "file", None) is not None:
            os.close(self.file)


class _Written(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Normalization(_Written):
    """What the model does to pixels scaled to [0, 1]: nothing more ("unit"), or standardize them per channel."""

    name: Literal["unit", "standardize"]
    mean: list[float] | None = None  # per channel, of the training split; "standardize" only
    std: list[float] | None = None


class DatasetDescription(_Written):
    """dataset.json, as the preprocess stage writes it: what train, evaluate, predict and MLflow know of the data."""

    class_names: list[str]
    sizes: dict[str, int]  # images per split
    normalization: Normalization
    archive_md5: str
    seed: int
    md5: dict[str, str] = {}  # of each prepared file, by name

    def as_written(self) -> dict:
        """The description as dataset.json holds it."""
        return self.model_dump(exclude_unset=True)


def load_description(prepared_dir: str | Path) -> DatasetDescription:
    """dataset.json: class names, split sizes, normalization, archive md5; DataError naming the
    file when it is missing or not what the preprocess stage writes."""
    path = Path(prepared_dir) / DATASET_FILE
    try:
        return DatasetDescription.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        raise DataError(f"{path} not found: run the preprocess stage first") from None
    except ValidationError as error:
        raise DataError(
            f"{path}: not a description written by the preprocess stage ({validation_problems(error)}): "
            f"restore it with `dvc checkout --force {prepared_dir}`, or run `dvc repro --force -s preprocess`"
        ) from None


def dataset_digest(prepared_dir: str | Path) -> str:
    """md5 of dataset.json, which holds the md5 of every array: one digest for the prepared data."""
    return hashlib.md5((Path(prepared_dir) / DATASET_FILE).read_bytes()).hexdigest()


def _checked_file(prepared_dir: Path, file_name: str) -> Path:
    """The prepared file, after comparing its md5 with the one dataset.json recorded (about 0.2 s for
    the 138 MB training images): a file damaged after preprocessing fails here, by name, not as a
    NaN loss an hour into training."""
    path = prepared_dir / file_name
    if not path.is_file():
        raise DataError(f"{path} not found: run the preprocess stage first")
    recorded = load_description(prepared_dir).md5.get(file_name)
    if recorded is not None and file_md5(path) != recorded:
        raise DataError(
            f"{path} is damaged (its md5 differs from the one in {DATASET_FILE}): restore it with "
            f"`dvc checkout --force {prepared_dir}`, or run `dvc repro --force -s preprocess`"
        )
    return path


def load_split(prepared_dir: str | Path, split: str) -> Split:
    """Memory-map one split, checked against dataset.json; the arrays are read from disk as they are
    used, not copied up front."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}, expected one of {SPLITS}")
    prepared_dir = Path(prepared_dir)
    images_path = _checked_file(prepared_dir, image_file(split))
    labels_path = _checked_file(prepared_dir, label_file(split))
    try:
        images = np.load(images_path, mmap_mode="r")
        labels = np.load(labels_path, mmap_mode="r")
    except ValueError as error:  # a truncated file that no md5 was recorded for
        raise DataError(
            f"{prepared_dir}: a {split} array is damaged ({error}): run `dvc checkout --force {prepared_dir}`"
        ) from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE:
        raise DataError(
            f"{prepared_dir / image_file(split)}: expected uint8 N x 32 x 32 x 3, got {images.dtype} "
            f"{images.shape}: prepared by another version of the preprocess stage? Run `dvc repro` again"
        )
    if len(labels) != len(images):
        raise DataError(f"{prepared_dir}: {split} has {len(images)} images but {len(labels)} labels")
    return Split(images=images, labels=labels, images_path=images_path)
