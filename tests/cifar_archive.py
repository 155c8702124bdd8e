"""Small archives in the official CIFAR-10 binary layout, made by the tests (no download needed)."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import numpy as np

CLASS_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
FOLDER = "cifar-10-batches-bin"


def records(images: np.ndarray, labels: np.ndarray) -> bytes:
    """Official record layout: label byte, then the R, G and B planes row-major."""
    planes = images.transpose(0, 3, 1, 2).reshape(len(images), 3072)
    return np.concatenate([labels[:, None].astype(np.uint8), planes], axis=1).astype(np.uint8).tobytes()


def random_split(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Images whose mean colour depends on the label, so a model can learn something from very few."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % 10
    rng.shuffle(labels)
    base = (labels[:, None, None, None] * 25).astype(np.int16)
    noise = rng.integers(-20, 21, size=(count, 32, 32, 3), dtype=np.int16)
    images = np.clip(base + noise, 0, 255).astype(np.uint8)
    return images, labels.astype(np.uint8)


def write_archive(
    path: Path,
    members: dict[str, bytes],
) -> str:
    """Write a tar.gz with the given members (name inside cifar-10-batches-bin/ -> bytes); return its md5."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(f"{FOLDER}/{name}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return hashlib.md5(path.read_bytes()).hexdigest()


def cifar_members(per_batch: int = 20, test_count: int = 40, seed: int = 0) -> dict[str, bytes]:
    """The members of a CIFAR-10 binary archive: 5 training batches, a test batch, the class names."""
    members = {"batches.meta.txt": ("\n".join(CLASS_NAMES) + "\n\n").encode()}
    for index in range(1, 6):
        members[f"data_batch_{index}.bin"] = records(*random_split(per_batch, seed + index))
    members["test_batch.bin"] = records(*random_split(test_count, seed + 100))
    return members


def make_cifar_archive(path: Path, per_batch: int = 20, test_count: int = 40, seed: int = 0) -> str:
    """A valid, tiny CIFAR-10 binary archive at `path`; returns its md5."""
    return write_archive(path, cifar_members(per_batch, test_count, seed))
