"""image_classifier.py: the served model's test-time views, that evaluate scores through them, and
the input forms it takes."""

from __future__ import annotations

import base64
import io

import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from PIL import Image

from alexnet8.dataset import Split
from alexnet8.evaluate import evaluate_model
from alexnet8.image_classifier import MAX_IMAGES, TIMEOUT_VARIABLE, ImageClassifier, view_config, views_per_image
from alexnet8.network import build_alexnet8

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


# --- the input forms --------------------------------------------------------------------------


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _probabilities(answer) -> np.ndarray:
    return answer[CLASSES].to_numpy()


def test_pixels_png_files_and_raw_pixels_in_base64_are_the_same_images():
    classifier = _classifier(build_alexnet8(dense_units=16))
    images = _images(5)
    expected = _probabilities(classifier.predict(None, images))
    files = [_png(image) for image in images]
    forms = {
        "file bytes": files,
        "base64 files": np.array([base64.b64encode(data).decode() for data in files]),  # as MLflow's server passes them
        "a table of base64 files": pd.DataFrame({"image": [base64.b64encode(data).decode() for data in files]}),
        "raw pixels, base64": {"pixels": np.array([base64.b64encode(image.tobytes()).decode() for image in images])},
        "pixels as floats": images.astype(np.float64),
    }
    for name, form in forms.items():
        np.testing.assert_array_equal(_probabilities(classifier.predict(None, form)), expected, err_msg=name)


def test_bad_items_are_named_by_their_place_in_the_request():
    classifier = _classifier(build_alexnet8(dense_units=16))
    good = base64.b64encode(_png(_images(1)[0])).decode()
    with pytest.raises(MlflowException) as raised:
        classifier.predict(None, [good, base64.b64encode(b"not an image").decode(), good, "no base64!"])
    assert raised.value.get_http_status_code() == 400
    assert raised.value.message == (
        "2 of 4 images can not be read: inputs[1]: not an image file Pillow can read; "
        "inputs[3]: not base64 text (Only base64 data is allowed): send each file's bytes base64-encoded"
    )
    with pytest.raises(MlflowException, match=r"inputs.pixels\[1\]: 3 bytes, not 3072 \(32 x 32 x 3 uint8\)"):
        classifier.predict(None, {"pixels": [base64.b64encode(bytes(3072)).decode(), "AAAA"]})
    with pytest.raises(MlflowException, match="expected 1 to any number of images per request, got 0"):
        classifier.predict(None, np.zeros((0, 32, 32, 3), np.uint8))


def test_in_process_any_number_of_images_and_served_at_most_max_images(monkeypatch):
    classifier = _classifier(build_alexnet8(dense_units=16))
    many = np.zeros((MAX_IMAGES + 1, 32, 32, 3), np.uint8)
    assert len(classifier.predict(None, many)) == MAX_IMAGES + 1
    monkeypatch.setenv(TIMEOUT_VARIABLE, "60")  # as `mlflow models serve` sets it
    with pytest.raises(MlflowException, match=f"expected 1 to {MAX_IMAGES} images per request, got {MAX_IMAGES + 1}"):
        classifier.predict(None, many)


class CountingNetwork:
    def __init__(self):
        self.batches = 0

    def predict_on_batch(self, images):
        self.batches += 1
        return np.full((len(images), len(CLASSES)), 1 / len(CLASSES))


def test_a_served_prediction_past_the_servers_timeout_stops_before_computing(monkeypatch):
    """The server has answered 504 by then: what is left is work nobody receives."""
    network = CountingNetwork()
    classifier = _classifier(network)
    monkeypatch.setenv(TIMEOUT_VARIABLE, "0")
    for images in (_images(3), [_png(image) for image in _images(3)]):
        with pytest.raises(MlflowException, match="not finished within the server's request timeout") as raised:
            classifier.predict(None, images)
        assert raised.value.get_http_status_code() == 504
    assert network.batches == 0
    monkeypatch.delenv(TIMEOUT_VARIABLE)
    classifier.predict(None, _images(3))
    assert network.batches == 1
