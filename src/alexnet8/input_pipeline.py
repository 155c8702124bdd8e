"""The input pipeline: batches of a prepared split for Keras, read from its file batch by batch,
shuffled and augmented for training.

Reads: the split's `.npy` file (through dataset.ImageReader). Writes: nothing.

Everything random here is stateless, a function of (seed, epoch, batch), so a training resumed
at epoch k sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from alexnet8.dataset import ImageReader, Split
from alexnet8.params import TrainParams

# Every random draw's seed is a function of (seed, epoch, batch), with salts that keep the draws
# apart. Changing any of these changes every batch, and so the weights of every recorded run.
BATCH_SEED_SALT = 1  # a batch's seed is (seed + 1, batch_seed_number(epoch, n))
BATCHES_PER_EPOCH_LIMIT = 1_000_000  # more batches than an epoch ever has
FIRST_FLIPS_SALT = 2  # "alternating" flips: the first epoch's coin per image draws from (seed, 2)
CUTOUT_SALT = 1  # the cutout squares draw from the batch seed folded with 1


def augment(
    images: tf.Tensor,
    seed: tf.Tensor,
    flip: bool,
    crop_padding: int,
    cutout_size: int = 0,
    positions: tf.Tensor | None = None,
    batch_length: tf.Tensor | None = None,
) -> tf.Tensor:
    """Random horizontal flip, random crop of the reflect-padded image and cutout, per image, stateless in `seed`.

    With `positions`, `images` are the rows at those positions of a batch of `batch_length`
    images (a worker's share, see make_dataset): the random draws are made for the whole batch
    and these rows' taken, so each image is augmented exactly as it is in the whole batch.
    """
    size = images.shape[1]

    def draw(shape_tail, **arguments):
        length = tf.shape(images)[0] if positions is None else batch_length
        values = tf.random.stateless_uniform([length, *shape_tail], **arguments)
        return values if positions is None else tf.gather(values, positions)

    if flip:
        # As tf.image.stateless_random_flip_left_right, with the draws of the whole batch.
        flips = tf.round(draw([], seed=seed, minval=0, maxval=1.0)) > 0
        images = tf.where(flips[:, None, None, None], tf.reverse(images, [2]), images)
    if crop_padding:
        padded = tf.pad(
            images, [[0, 0], [crop_padding, crop_padding], [crop_padding, crop_padding], [0, 0]], mode="REFLECT"
        )
        offsets = draw([2], seed=seed[::-1], minval=0, maxval=2 * crop_padding + 1, dtype=tf.int32)
        rows = offsets[:, :1] + tf.range(size)[None, :]
        columns = offsets[:, 1:] + tf.range(size)[None, :]
        images = tf.gather(tf.gather(padded, rows, axis=1, batch_dims=1), columns, axis=2, batch_dims=1)
    if cutout_size:
        # The square's centre is anywhere in the image, so it may hang over an edge (DeVries & Taylor, 2017).
        corners = (
            draw(
                [2],
                seed=tf.random.experimental.stateless_fold_in(seed, CUTOUT_SALT),
                minval=0,
                maxval=size,
                dtype=tf.int32,
            )
            - cutout_size // 2
        )
        pixels = tf.range(size)[None, :]
        inside_rows = (pixels >= corners[:, :1]) & (pixels < corners[:, :1] + cutout_size)
        inside_columns = (pixels >= corners[:, 1:]) & (pixels < corners[:, 1:] + cutout_size)
        inside = inside_rows[:, :, None, None] & inside_columns[:, None, :, None]
        images = tf.where(inside, tf.zeros_like(images), images)
    return images


def batch_seed_number(epoch: tf.Tensor, number: tf.Tensor) -> tf.Tensor:
    """The second half of batch `number`'s seed in `epoch`: both can be read back from it (epoch_of)."""
    return epoch * BATCHES_PER_EPOCH_LIMIT + number


def epoch_of(batch_seed: tf.Tensor) -> tf.Tensor:
    """The epoch whose batch has the seed `batch_seed` (see batch_seed_number)."""
    return batch_seed[1] // BATCHES_PER_EPOCH_LIMIT


def make_dataset(
    split: Split,
    batch_size: int,
    shuffle_seed: int | None = None,
    first_epoch: int = 0,
    random_flip: bool | str = False,
    random_crop_padding: int = 0,
    cutout_size: int = 0,
    one_hot_classes: int = 0,
    workers: int = 1,
    rank: int = 0,
) -> tf.data.Dataset:
    """Batches of (images, labels) of the split, read from its file batch by batch (ImageReader).

    With `shuffle_seed`, the stream never ends and epoch e is a fresh permutation that depends
    only on (seed, e), as `model.fit(shuffle=True)` but stateless; augmentation draws from
    (seed, e, batch): training resumed at epoch k sees exactly the batches an uninterrupted run
    would (fit with `steps_per_epoch`). Without it, one pass in order, never augmented.
    With `one_hot_classes`, labels are one-hot vectors of that length (for label smoothing).
    `random_flip` is True (each image at random), "alternating" (each image at random in epoch
    0, then the other way from its last epoch) or False.

    With `workers` > 1, the stream of worker `rank`: rows rank, rank + workers, ... of each batch
    of `batch_size` (the global batch), read and augmented as in the whole batch, so the workers'
    shares of a step together are exactly the one-worker batch. Only those rows are read.
    """
    read = _batch_reader(split, one_hot_classes)
    count = len(split.labels)
    if shuffle_seed is None:
        batches = tf.data.Dataset.range(count).batch(batch_size)
        if workers > 1:
            batches = batches.map(lambda index: _share(index, workers, rank)[1])
        return _without_autotuning(batches.map(read).prefetch(2))
    seed = tf.constant(shuffle_seed, tf.int64)
    flip_alternately = _alternating_flips(seed, count) if random_flip == "alternating" else None
    flip = random_flip is True

    def read_and_augment(batch_seed, index):
        positions = batch_length = None
        if workers > 1:
            batch_length = tf.shape(index, out_type=tf.int32)[0]
            positions, index = _share(index, workers, rank)
        images, batch_labels = read(index)
        if flip_alternately is not None:
            images = flip_alternately(images, index, batch_seed)
        if flip or random_crop_padding or cutout_size:
            images = augment(images, batch_seed, flip, random_crop_padding, cutout_size, positions, batch_length)
        return images, batch_labels

    batches = _shuffled_batches(seed, count, batch_size, first_epoch)
    return _without_autotuning(batches.map(read_and_augment, num_parallel_calls=2).prefetch(2))


def _batch_reader(split: Split, one_hot_classes: int):
    """A tf.data function: image indices -> (images, labels) of the split, labels one-hot if asked."""
    reader = ImageReader(split)
    labels = tf.constant(np.asarray(split.labels))
    image_shape = split.images.shape[1:]

    def read(index):
        # Reading is deterministic, so tf.data may run it in parallel and ahead of the model.
        images = tf.numpy_function(reader, [index], tf.as_dtype(split.images.dtype), stateful=False)
        batch_labels = tf.gather(labels, index)
        if one_hot_classes:
            batch_labels = tf.one_hot(batch_labels, one_hot_classes)
        return tf.ensure_shape(images, [None, *image_shape]), batch_labels

    return read


def _share(index: tf.Tensor, workers: int, rank: int) -> tuple[tf.Tensor, tf.Tensor]:
    """Worker `rank`'s rows of a global batch: their positions in it, and their image indices."""
    positions = tf.range(rank, tf.shape(index, out_type=tf.int32)[0], workers)
    return positions, tf.gather(index, positions)


def _shuffled_batches(seed: tf.Tensor, count: int, batch_size: int, first_epoch: int) -> tf.data.Dataset:
    """(batch seed, image indices) of every batch from `first_epoch` on, each epoch a permutation of (seed, epoch)."""

    def epoch_batches(epoch):
        order = tf.random.experimental.stateless_shuffle(tf.range(count, dtype=tf.int64), seed=tf.stack([seed, epoch]))
        numbered = tf.data.Dataset.from_tensor_slices(order).batch(batch_size).enumerate()
        return numbered.map(
            lambda number, index: (tf.stack([seed + BATCH_SEED_SALT, batch_seed_number(epoch, number)]), index)
        )

    return tf.data.Dataset.range(first_epoch, tf.int64.max).flat_map(epoch_batches)


def _alternating_flips(seed: tf.Tensor, count: int):
    """Derandomized flips (airbench, Jordan 2024): each image is seen both ways in any two
    consecutive epochs, from a fair coin per image in the first. A function (images, their
    indices, the batch seed) -> the images flipped as their epoch says."""
    first_flips = tf.random.stateless_uniform([count], seed=tf.stack([seed, FIRST_FLIPS_SALT])) < 0.5

    def flip(images, index, batch_seed):
        odd_epoch = epoch_of(batch_seed) % 2 == 1
        flips = tf.not_equal(tf.gather(first_flips, index), odd_epoch)
        return tf.where(flips[:, None, None, None], tf.reverse(images, [2]), images)

    return flip


def _without_autotuning(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """`dataset` with fixed parallelism instead of tf.data's autotuning.

    A batch is read and augmented in well under a millisecond against a training step of 100 ms
    or more, so two batches in flight keep the model fed. Autotuning would add nothing but its
    own thread, which wakes on a doubling period of up to a minute: deleting an unfinished
    iterator (the endless training stream, when fit ends) waits for its next wake-up, which
    cost up to a minute at the end of every training (52 s measured after 5 epochs).
    """
    options = tf.data.Options()
    options.autotune.enabled = False
    return dataset.with_options(options)


def one_hot_length(params: TrainParams, num_classes: int) -> int:
    """The length of one-hot targets, which label smoothing needs; 0 for class indices."""
    return num_classes if params.label_smoothing else 0


def training_dataset(
    params: TrainParams,
    split: Split,
    seed: int,
    num_classes: int,
    first_epoch: int = 0,
    workers: int = 1,
    rank: int = 0,
) -> tf.data.Dataset:
    """The endless, shuffled and augmented training stream that `params` describe (see make_dataset),
    or worker `rank`'s share of it."""
    return make_dataset(
        split,
        params.batch_size,
        shuffle_seed=seed,
        first_epoch=first_epoch,
        random_flip=params.random_flip,
        random_crop_padding=params.random_crop_padding,
        cutout_size=params.cutout_size,
        one_hot_classes=one_hot_length(params, num_classes),
        workers=workers,
        rank=rank,
    )
