"""Stage `preprocess`: CIFAR-10 binary archive -> image and label arrays, split for validation.

Reads: the archive at `--archive`; params `seed`, `preprocess.validation_fraction`,
`preprocess.normalization`.
Writes: the folder `--out` with `{train,validation,test}_{images,labels}.npy` (images: the raw
RGB pixels, uint8 N x 32 x 32 x 3; labels uint8) that training reads batch by batch, and
`dataset.json` (class names, split sizes, the normalization and its statistics, the archive's
md5, the arrays' md5s). The folder appears complete or not at all. Pixels stay as they are: the
model normalizes them itself (network.py), so what it is trained on is what a user has.

The archive is read with numpy from its binary records (1 label byte, then 1024 red, 1024 green,
1024 blue pixel bytes, row-major): nothing in it is unpickled, executed or extracted to disk.
"""

from __future__ import annotations

import argparse
import logging
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from alexnet8.dataset import DATASET_FILE, SPLITS, DatasetDescription, image_file, label_file
from alexnet8.errors import DataError
from alexnet8.files import atomic_directory, disk_full, file_md5, no_space_message, write_json
from alexnet8.params import Params, PreprocessParams

logger = logging.getLogger(__name__)

MEMBER_FOLDER = "cifar-10-batches-bin"
TRAIN_MEMBERS = tuple(f"{MEMBER_FOLDER}/data_batch_{index}.bin" for index in range(1, 6))
TEST_MEMBER = f"{MEMBER_FOLDER}/test_batch.bin"
META_MEMBER = f"{MEMBER_FOLDER}/batches.meta.txt"
CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
RECORD_BYTES = 1 + 32 * 32 * 3


@dataclass(frozen=True)
class RawDataset:
    """CIFAR-10 as uint8 images (N x 32 x 32 x 3) and uint8 labels, as read from the archive."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: tuple[str, ...]
    archive_md5: str


def parse_records(data: bytes, member: str) -> tuple[np.ndarray, np.ndarray]:
    """Split one batch file's bytes into images (N x 32 x 32 x 3, uint8) and labels (N, uint8)."""
    if len(data) == 0 or len(data) % RECORD_BYTES:
        raise DataError(f"{member}: {len(data)} bytes is not a whole number of {RECORD_BYTES}-byte CIFAR-10 records")
    records = np.frombuffer(data, dtype=np.uint8).reshape(-1, RECORD_BYTES)
    labels = records[:, 0].copy()
    if labels.max() >= len(CLASS_NAMES):
        bad = int(np.argmax(labels >= len(CLASS_NAMES)))
        raise DataError(f"{member}: record {bad} has label {labels[bad]}, expected 0-{len(CLASS_NAMES) - 1}")
    # Channel planes (3 x 32 x 32) -> height x width x channel, the layout Keras expects.
    images = records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy()
    return images, labels


def _read_member(archive: tarfile.TarFile, name: str, archive_path: Path) -> bytes:
    try:
        member = archive.getmember(name)
    except KeyError:
        raise DataError(f"{archive_path}: member {name} is missing: not a CIFAR-10 binary archive") from None
    # Links could point anywhere; only plain files are read, and never extracted to disk.
    if not member.isfile():
        raise DataError(f"{archive_path}: member {name} is not a regular file")
    return archive.extractfile(member).read()


def read_archive(archive_path: str | Path) -> RawDataset:
    """Read the official CIFAR-10 binary archive (tar.gz) without extracting it.

    Raises DataError naming the file and the problem: not gzip/tar, a missing member, records of
    the wrong size, labels outside 0-9.
    """
    archive_path = Path(archive_path)
    if not archive_path.is_file():
        raise DataError(f"{archive_path}: archive not found (run the fetch stage first)")
    digest = file_md5(archive_path)
    try:
        with tarfile.open(archive_path, mode="r:gz") as archive:
            train_parts = [parse_records(_read_member(archive, name, archive_path), name) for name in TRAIN_MEMBERS]
            test_images, test_labels = parse_records(_read_member(archive, TEST_MEMBER, archive_path), TEST_MEMBER)
            try:
                meta = _read_member(archive, META_MEMBER, archive_path).decode("ascii").split()
            except (DataError, UnicodeDecodeError):
                meta = []
    except (tarfile.TarError, EOFError, OSError, zlib.error) as error:
        raise DataError(f"{archive_path}: not a readable tar.gz archive: {error}") from None
    class_names = tuple(meta) if len(meta) == len(CLASS_NAMES) else CLASS_NAMES
    return RawDataset(
        train_images=np.concatenate([images for images, _ in train_parts]),
        train_labels=np.concatenate([labels for _, labels in train_parts]),
        test_images=test_images,
        test_labels=test_labels,
        class_names=class_names,
        archive_md5=digest,
    )


def split_indices(count: int, validation_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded shuffle of `range(count)` into (train, validation) indices, each kept in ascending order."""
    validation_count = round(count * validation_fraction)
    if not 0 < validation_count < count:
        raise DataError(
            f"preprocess.validation_fraction={validation_fraction} gives {validation_count} validation "
            f"images out of {count}: need at least 1 and fewer than {count}"
        )
    order = np.random.default_rng(seed).permutation(count)
    return np.sort(order[validation_count:]), np.sort(order[:validation_count])


def split_and_describe(
    raw: RawDataset, params: PreprocessParams, seed: int
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, object]]:
    """Hold out the validation split. Returns {split: (uint8 images, uint8 labels)} and the
    normalization the model is to apply: its name and, to standardize, the per-channel mean and
    standard deviation of the training split's pixels scaled to [0, 1]."""
    train_index, validation_index = split_indices(len(raw.train_labels), params.validation_fraction, seed)
    splits = {
        "train": (raw.train_images[train_index], raw.train_labels[train_index]),
        "validation": (raw.train_images[validation_index], raw.train_labels[validation_index]),
        "test": (raw.test_images, raw.test_labels),
    }
    normalization: dict[str, object] = {"name": params.normalization}
    if params.normalization == "standardize":
        # Statistics from the training split only, so nothing leaks from validation or test.
        train_unit = splits["train"][0].astype(np.float32) / np.float32(255.0)
        mean = train_unit.mean(axis=(0, 1, 2), dtype=np.float64).astype(np.float32)
        std = train_unit.std(axis=(0, 1, 2), dtype=np.float64).astype(np.float32)
        normalization.update(mean=mean.tolist(), std=std.tolist())
    return splits, normalization


def preprocess(archive_path: str | Path, out_dir: str | Path, params: PreprocessParams, seed: int) -> dict[str, object]:
    """The stage: read, split, normalize and save. Returns what it wrote to dataset.json."""
    raw = read_archive(archive_path)
    splits, normalization = split_and_describe(raw, params, seed)
    description = {
        "class_names": list(raw.class_names),
        "sizes": {name: int(len(labels)) for name, (_, labels) in splits.items()},
        "normalization": normalization,
        "archive_md5": raw.archive_md5,
        "seed": seed,
    }
    needed = sum(images.nbytes + labels.nbytes for images, labels in splits.values())
    try:
        with atomic_directory(out_dir) as temporary:
            digests = {}
            for name in SPLITS:
                images, labels = splits[name]
                for file_name, array in ((image_file(name), images), (label_file(name), labels)):
                    np.save(temporary / file_name, array)
                    digests[file_name] = file_md5(temporary / file_name)
            description["md5"] = digests
            write_json(temporary / DATASET_FILE, DatasetDescription(**description).as_written())
    except OSError as error:
        folder = Path(out_dir).resolve().parent
        if not disk_full(error, folder, needed):
            raise
        raise DataError(no_space_message(folder, "the prepared data", needed)) from None
    logger.info(
        "wrote %s: %s images, normalization %s",
        out_dir,
        ", ".join(f"{count} {name}" for name, count in description["sizes"].items()),
        params.normalization,
    )
    return description


def main(arguments: argparse.Namespace, params: Params) -> None:
    """The stage, as `python -m alexnet8 preprocess` runs it: `arguments` are its options, `params` validated."""
    preprocess(arguments.archive, arguments.out, params.preprocess, params.seed)
