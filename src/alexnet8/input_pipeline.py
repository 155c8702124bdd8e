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
            draw([2], seed=tf.random.experimental.stateless_fold_in(seed, 1), minval=0, maxval=size, dtype=tf.int32)
            - cutout_size // 2
        )
        pixels = tf.range(size)[None, :]
        inside_rows = (pixels >= corners[:, :1]) & (pixels < corners[:, :1] + cutout_size)
        inside_columns = (pixels >= corners[:, 1:]) & (pixels < corners[:, 1:] + cutout_size)
        inside = inside_rows[:, :, None, None] & inside_columns[:, None, :, None]
        images = tf.where(inside, tf.zeros_like(images), images)
    return images


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
    reader = ImageReader(split)
    labels = tf.constant(np.asarray(split.labels))
    count = len(split.labels)
    image_shape = split.images.shape[1:]

    def read(index):
        # Reading is deterministic, so tf.data may run it in parallel and ahead of the model.
        images = tf.numpy_function(reader, [index], tf.as_dtype(split.images.dtype), stateful=False)
        batch_labels = tf.gather(labels, index)
        if one_hot_classes:
            batch_labels = tf.one_hot(batch_labels, one_hot_classes)
        return tf.ensure_shape(images, [None, *image_shape]), batch_labels

    def share(index):
        # This worker's rows of a global batch: their positions in it, and their image indices.
        positions = tf.range(rank, tf.shape(index, out_type=tf.int32)[0], workers)
        return positions, tf.gather(index, positions)

    if shuffle_seed is None:
        batches = tf.data.Dataset.range(count).batch(batch_size)
        if workers > 1:
            batches = batches.map(lambda index: share(index)[1])
        return _without_autotuning(batches.map(read).prefetch(2))

    seed = tf.constant(shuffle_seed, tf.int64)

    def epoch_batches(epoch):
        order = tf.random.experimental.stateless_shuffle(tf.range(count, dtype=tf.int64), seed=tf.stack([seed, epoch]))
        numbered = tf.data.Dataset.from_tensor_slices(order).batch(batch_size).enumerate()
        return numbered.map(lambda number, index: (tf.stack([seed + 1, epoch * 1_000_000 + number]), index))

    if random_flip == "alternating":
        # Derandomized flips (airbench, Jordan 2024): each image is seen both ways in any two
        # consecutive epochs, from a fair coin per image in the first.
        first_flips = tf.random.stateless_uniform([count], seed=tf.stack([seed, 2])) < 0.5

    def read_and_augment(batch_seed, index):
        positions = batch_length = None
        if workers > 1:
            batch_length = tf.shape(index, out_type=tf.int32)[0]
            positions, index = share(index)
        images, batch_labels = read(index)
        if random_flip == "alternating":
            odd_epoch = (batch_seed[1] // 1_000_000) % 2 == 1  # epoch_batches numbers a batch epoch * 1_000_000 + n
            flips = tf.not_equal(tf.gather(first_flips, index), odd_epoch)
            images = tf.where(flips[:, None, None, None], tf.reverse(images, [2]), images)
        flip = random_flip is True
        if flip or random_crop_padding or cutout_size:
            images = augment(images, batch_seed, flip, random_crop_padding, cutout_size, positions, batch_length)
        return images, batch_labels

    batches = tf.data.Dataset.range(first_epoch, tf.int64.max).flat_map(epoch_batches)
    return _without_autotuning(batches.map(read_and_augment, num_parallel_calls=2).prefetch(2))


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
