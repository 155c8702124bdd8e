"""preprocess: records parsed with numpy, a seeded validation split, normalization, nothing half-written."""

from __future__ import annotations

import gzip
import json
import re
import subprocess
import sys

import numpy as np
import pytest
from cifar_archive import cifar_members, random_split, records, write_archive
from helpers import write_params

from alexnet8.dataset import load_description, load_split
from alexnet8.errors import DataError
from alexnet8.params import PreprocessParams
from alexnet8.preprocess import preprocess, read_archive


def test_records_are_decoded_to_images_and_labels(tmp_path):
    images, labels = random_split(30, seed=1)
    members = cifar_members(per_batch=10, test_count=30)
    members["test_batch.bin"] = records(images, labels)
    archive = tmp_path / "cifar.tar.gz"
    write_archive(archive, members)
    raw = read_archive(archive)
    np.testing.assert_array_equal(raw.test_images, images)  # planes -> height x width x channel
    np.testing.assert_array_equal(raw.test_labels, labels)
    assert raw.train_images.shape == (50, 32, 32, 3) and raw.train_images.dtype == np.uint8
    assert raw.class_names[0] == "airplane" and len(raw.class_names) == 10


def test_prepared_arrays_have_the_shapes_and_split_sizes(prepared_dir, tiny_archive):
    description = load_description(prepared_dir)
    assert description.sizes == {"train": 90, "validation": 10, "test": 40}
    assert description.archive_md5 == tiny_archive[1]
    for split, size in description.sizes.items():
        data = load_split(prepared_dir, split)
        assert data.images.shape == (size, 32, 32, 3) and data.images.dtype == np.uint8
        assert data.labels.shape == (size,)
        assert isinstance(data.images, np.memmap)  # training reads from disk, not a copy


def test_prepared_pixels_are_the_archives_as_they_are(tiny_archive, prepared_dir):
    np.testing.assert_array_equal(load_split(prepared_dir, "test").images, read_archive(tiny_archive[0]).test_images)


def test_split_is_seeded_disjoint_and_complete(tiny_archive, tmp_path):
    params = PreprocessParams(validation_fraction=0.2, normalization="unit")
    preprocess(tiny_archive[0], tmp_path / "a", params, seed=7)
    preprocess(tiny_archive[0], tmp_path / "b", params, seed=7)
    preprocess(tiny_archive[0], tmp_path / "c", params, seed=8)
    first, again, other = (load_split(tmp_path / name, "validation").images for name in "abc")
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    train = load_split(tmp_path / "a", "train").images
    every = np.concatenate([train, first]).reshape(100, -1)
    assert len(np.unique(every, axis=0)) == 100  # each training image lands in exactly one split


def test_standardize_uses_training_statistics_only(tiny_archive, tmp_path):
    import keras

    from alexnet8.network import build_alexnet8

    params = PreprocessParams(validation_fraction=0.1, normalization="standardize")
    description = preprocess(tiny_archive[0], tmp_path / "std", params, seed=42)
    model = build_alexnet8(dense_units=16, normalization=description["normalization"])
    standardize = keras.Model(model.input, model.get_layer("standardize").output)
    train = standardize.predict(load_split(tmp_path / "std", "train").images, verbose=0)
    np.testing.assert_allclose(train.mean(axis=(0, 1, 2)), 0, atol=1e-4)
    np.testing.assert_allclose(train.std(axis=(0, 1, 2)), 1, atol=1e-3)
    saved = json.loads((tmp_path / "std" / "dataset.json").read_text())["normalization"]
    assert saved == description["normalization"] and saved["name"] == "standardize" and len(saved["mean"]) == 3


def _broken(members, name, data=None):
    members = dict(members)
    if data is None:
        del members[name]
    else:
        members[name] = data
    return members


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: _broken(m, "data_batch_3.bin"), "member cifar-10-batches-bin/data_batch_3.bin is missing"),
        (lambda m: _broken(m, "test_batch.bin", m["test_batch.bin"][:-5]), "is not a whole number of 3073-byte"),
        (
            lambda m: _broken(m, "data_batch_1.bin", b"\x0c" + m["data_batch_1.bin"][1:]),
            "record 0 has label 12, expected 0-9",
        ),
    ],
    ids=["missing member", "wrong record size", "label out of range"],
)
def test_a_bad_archive_is_refused_and_nothing_is_written(tmp_path, change, message):
    archive = tmp_path / "bad.tar.gz"
    write_archive(archive, change(cifar_members(per_batch=10, test_count=10)))
    with pytest.raises(DataError, match=message):
        preprocess(
            archive, tmp_path / "prepared", PreprocessParams(validation_fraction=0.1, normalization="unit"), seed=1
        )
    assert sorted(path.name for path in tmp_path.iterdir()) == ["bad.tar.gz"]


@pytest.mark.parametrize(
    "content", [b"not an archive at all", gzip.compress(b"gzip, but no tar inside")], ids=["not gzip", "not tar"]
)
def test_a_file_that_is_not_a_tar_gz_is_named(tmp_path, content):
    archive = tmp_path / "cifar.tar.gz"
    archive.write_bytes(content)
    with pytest.raises(DataError, match=f"{archive}: not a readable tar.gz archive"):
        read_archive(archive)


def test_too_few_images_for_the_validation_fraction(tmp_path):
    archive = tmp_path / "cifar.tar.gz"
    write_archive(archive, cifar_members(per_batch=1, test_count=10))
    with pytest.raises(DataError, match="validation_fraction=0.01 gives 0 validation images out of 5"):
        preprocess(
            archive, tmp_path / "prepared", PreprocessParams(validation_fraction=0.01, normalization="unit"), seed=1
        )


def test_a_full_disk_names_the_folder_and_the_space_needed(tiny_archive, small_disk, tmp_path):
    """The stage on a disk too small for its arrays (NumPy's short write raises an OSError without
    errno): the user sees one line naming the folder and the space, no traceback, nothing written."""
    disk = small_disk("256k")  # the tiny archive's arrays take 430 kB
    params = write_params(tmp_path / "params.yaml")
    stage = [sys.executable, "-m", "alexnet8", "preprocess", "--params", str(params)]
    result = subprocess.run(
        [*stage, "--archive", str(tiny_archive[0]), "--out", str(disk / "prepared")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stderr
    assert re.search(
        rf"no space left on the device of {disk}: the prepared data needs 0.4 MB \(0.3 MB free now\); nothing was "
        r"written\. Free some space and rerun `dvc repro`",
        result.stderr,
    ), result.stderr
    assert "Traceback" not in result.stderr
    assert list(disk.iterdir()) == []
