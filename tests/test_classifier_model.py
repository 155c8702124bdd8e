"""classifier_model.py: the served model's test-time views, and that evaluate scores through them."""

from __future__ import annotations

import numpy as np
import pytest

from alexnet8.classifier_model import ImageClassifier, view_config, views_per_image
from alexnet8.dataset import Split
from alexnet8.evaluate import evaluate_model
from alexnet8.model import build_alexnet8

CLASSES = [str(index) for index in range(10)]


def _images(count: int) -> np.ndarray:
    return np.random.default_rng(3).integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)


def _classifier(network, flip: bool = False, translate: int = 0) -> ImageClassifier:
    return ImageClassifier.assembled(network, CLASSES, view_config(flip, translate))


def test_flip_tta_averages_an_image_and_its_mirror():
    network = build_alexnet8(dense_units=16)
    images = _images(20)
    split = Split(images=images, labels=(np.arange(20) % 10).astype(np.uint8))
    plain, _ = evaluate_model(_classifier(network), split, batch_size=10)
    tta, _ = evaluate_model(_classifier(network, flip=True), split, batch_size=10)
    mirrored = Split(images=np.ascontiguousarray(images[:, :, ::-1]), labels=split.labels)
    mirror, _ = evaluate_model(_classifier(network, flip=True), mirrored, batch_size=10)
    assert tta["loss"] != plain["loss"]
    assert tta["loss"] == pytest.approx(mirror["loss"], rel=1e-5)  # symmetric in the flip


def test_translation_tta_weighs_the_image_half_and_each_reflect_shifted_copy_a_quarter():
    network = build_alexnet8(dense_units=16)
    images = _images(8)
    # Shifted by one pixel down-right and up-left, the border row and column mirrored (reflect padding).
    down_right = images[:, [1, *range(31)]][:, :, [1, *range(31)]]
    up_left = images[:, [*range(1, 32), 30]][:, :, [*range(1, 32), 30]]
    expected = (
        network.predict_on_batch(images) / 2
        + network.predict_on_batch(down_right) / 4
        + network.predict_on_batch(up_left) / 4
    )
    np.testing.assert_allclose(_classifier(network, translate=1).probabilities(images), expected, rtol=1e-5)
    np.testing.assert_array_equal(_classifier(network).probabilities(images), network.predict_on_batch(images))


def test_what_evaluate_predicts_is_what_the_served_model_answers():
    network = build_alexnet8(dense_units=16)
    classifier = _classifier(network, flip=True, translate=1)
    images = _images(30)
    split = Split(images=images, labels=(np.arange(30) % 10).astype(np.uint8))
    _, predicted = evaluate_model(classifier, split, batch_size=7)
    answered = classifier.predict(None, images)
    assert list(answered["class"]) == [CLASSES[index] for index in predicted]


@pytest.mark.parametrize(("flip", "translate", "passes"), [(False, 0, 1), (True, 0, 2), (False, 2, 3), (True, 1, 6)])
def test_each_view_setting_costs_its_forward_passes(flip, translate, passes):
    assert views_per_image(view_config(flip, translate)) == passes


@pytest.mark.parametrize("translate", [-1, 16, 1.5, True])
def test_a_bad_translation_is_refused_by_name(translate):
    with pytest.raises(ValueError, match="tta_translate must be a whole number of pixels"):
        view_config(True, translate)


def test_evaluation_reads_the_test_file_batch_by_batch_with_keras_predictions(prepared_dir):
    from alexnet8.dataset import load_split

    model = build_alexnet8(dense_units=16)
    split = load_split(prepared_dir, "test")
    metrics, predicted = evaluate_model(_classifier(model), split, batch_size=16)  # 40 images: a short last batch
    expected = model.predict(np.asarray(split.images), batch_size=16, verbose=0).argmax(axis=1)
    np.testing.assert_array_equal(predicted, expected)
    assert metrics["accuracy"] == pytest.approx(np.mean(expected == np.asarray(split.labels)))
