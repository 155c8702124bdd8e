"""The input pipeline (input_pipeline.py): augmentation, batches read from the prepared files."""

from __future__ import annotations

import numpy as np
import pytest

from alexnet8.dataset import Split
from alexnet8.input_pipeline import make_dataset


def _asymmetric_split(count=64):
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)  # raw pixels, as the model takes them
    return Split(images=images, labels=(np.arange(count) % 10).astype(np.uint8))


def _first_epoch(dataset, count, batch_size):
    batches = list(dataset.take(int(np.ceil(count / batch_size))).as_numpy_iterator())
    return np.concatenate([images for images, _ in batches]), np.concatenate([labels for _, labels in batches])


def test_random_flip_keeps_each_label_with_its_image():
    split = _asymmetric_split()
    images, labels = _first_epoch(make_dataset(split, 16, shuffle_seed=1, random_flip=True), 64, 16)
    flipped = 0
    for image, label in zip(images, labels, strict=True):
        [match] = [
            index
            for index, original in enumerate(split.images)
            if np.array_equal(image, original) or np.array_equal(image, original[:, ::-1])
        ]
        assert split.labels[match] == label
        flipped += not np.array_equal(image, split.images[match])
    assert 10 < flipped < 54  # about half


def _flipped_per_image(split, images):
    """Whether each of the split's images appears mirrored in `images` (one epoch of them)."""
    flipped = {}
    for image in images:
        [(index, mirrored)] = [
            (index, mirrored)
            for index, original in enumerate(split.images)
            for mirrored, candidate in ((False, original), (True, original[:, ::-1]))
            if np.array_equal(image, candidate)
        ]
        flipped[index] = mirrored
    return np.array([flipped[index] for index in range(len(split.images))])


def test_alternating_flip_shows_each_image_the_other_way_each_epoch():
    split = _asymmetric_split()
    dataset = make_dataset(split, 16, shuffle_seed=1, random_flip="alternating")
    batches = list(dataset.take(3 * 4).as_numpy_iterator())  # 3 epochs of 4 batches
    epochs = [np.concatenate([images for images, _ in batches[4 * epoch : 4 * epoch + 4]]) for epoch in range(3)]
    first, second, third = (_flipped_per_image(split, images) for images in epochs)
    assert 10 < first.sum() < 54  # about half, at random
    np.testing.assert_array_equal(second, ~first)
    np.testing.assert_array_equal(third, first)
    resumed = make_dataset(split, 16, shuffle_seed=1, first_epoch=1, random_flip="alternating")
    resumed_images = np.concatenate([images for images, _ in resumed.take(4).as_numpy_iterator()])
    np.testing.assert_array_equal(_flipped_per_image(split, resumed_images), second)


def test_random_crop_is_a_window_of_the_reflect_padded_image():
    split = _asymmetric_split()
    images, labels = _first_epoch(make_dataset(split, 16, shuffle_seed=1, random_crop_padding=4), 64, 16)
    shifted = 0
    for image, label in zip(images, labels, strict=True):
        candidates = [index for index in range(64) if split.labels[index] == label]
        padded = {index: np.pad(split.images[index], ((4, 4), (4, 4), (0, 0)), mode="reflect") for index in candidates}
        windows = [
            (index, row, column)
            for index in candidates
            for row in range(9)
            for column in range(9)
            if np.array_equal(padded[index][row : row + 32, column : column + 32], image)
        ]
        assert windows, "not a crop of any image with this label"
        shifted += windows[0][1:] != (4, 4)
    assert shifted > 40


def test_augmentation_is_a_function_of_seed_and_epoch():
    split = _asymmetric_split()
    options = dict(shuffle_seed=5, random_flip=True, random_crop_padding=4, cutout_size=8)
    epoch_two, _ = _first_epoch(make_dataset(split, 16, first_epoch=2, **options), 64, 16)
    from_start = make_dataset(split, 16, **options).skip(2 * 4)
    again, _ = _first_epoch(from_start, 64, 16)
    np.testing.assert_array_equal(epoch_two, again)  # what a resumed run sees at epoch 2


def test_cutout_zeroes_one_square_per_image_and_keeps_labels():
    split = _asymmetric_split()
    images, labels = _first_epoch(make_dataset(split, 16, shuffle_seed=1, cutout_size=8), 64, 16)
    for image, label in zip(images, labels, strict=True):
        [match] = [
            index
            for index, original in enumerate(split.images)
            if np.array_equal((image == 0) | (image == original), np.ones_like(image, bool))
        ]
        assert split.labels[match] == label
        zero_rows, zero_columns = np.nonzero((image == 0).all(axis=2))
        # One rectangle of at most 8 x 8 (smaller where it hangs over an edge), at least 4 x 4.
        height, width = np.ptp(zero_rows) + 1, np.ptp(zero_columns) + 1
        assert 4 <= height <= 8 and 4 <= width <= 8 and len(zero_rows) == height * width


def test_validation_and_test_data_are_never_augmented():
    split = _asymmetric_split(20)
    images, _ = _first_epoch(make_dataset(split, 8), 20, 8)
    np.testing.assert_array_equal(images, split.images)


def test_training_batches_are_read_from_the_file_as_from_the_array(prepared_dir):
    from alexnet8.dataset import load_split

    from_file = load_split(prepared_dir, "train")
    assert from_file.images_path is not None
    in_memory = Split(images=np.array(from_file.images), labels=np.array(from_file.labels))
    from_file_batches, in_memory_batches = (
        _first_epoch(make_dataset(split, 16, shuffle_seed=5, random_flip=True), len(split.labels), 16)
        for split in (from_file, in_memory)
    )
    for read, indexed in zip(from_file_batches, in_memory_batches, strict=True):
        np.testing.assert_array_equal(read, indexed)


def test_a_truncated_image_file_is_named(prepared_dir, tmp_path):
    import shutil

    from alexnet8.dataset import ImageReader, image_file, load_split
    from alexnet8.errors import DataError

    shutil.copytree(prepared_dir, tmp_path / "prepared")
    split = load_split(tmp_path / "prepared", "train")
    with open(split.images_path, "r+b") as stream:
        stream.truncate(split.images_path.stat().st_size - 100)
    with pytest.raises(DataError, match=image_file("train")):
        ImageReader(split)(np.array([len(split.labels) - 1]))
