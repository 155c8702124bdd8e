"""The registered champion served by `mlflow models serve`, over real HTTP on 127.0.0.1.

One small AlexNet8 (dense_units=64, trained for 8 epochs on the tiny archive by the train stage)
is scored, logged, registered as `alexnet8-cifar10` and made `champion` by the evaluate stage
with test-time views on (flip and 1-pixel shifts), then served once for the module, from the
activated environment as the README tells users to run `mlflow`. Loaded as users load it, the
champion scores what its registry tag, the metrics file and MLflow say.

`POST /invocations` takes images as pixels (`{"inputs": [image, ...]}`, each a 32 x 32 x 3 nested
list of 0-255 numbers; or `{"inputs": {"pixels": [...]}}`, each image's 3,072 bytes in base64) or
as image files in base64 (`{"inputs": ["/9j/4AAQ...", ...]}`: JPEG, PNG, any size and mode, decoded
as `python -m alexnet8.predict` decodes them). The answer is, one object per image, in request order:

    {"predictions": [{"class": "frog", "airplane": 0.0123, "automobile": 0.0045, ..., "truck": 0.0311}, ...]}

`class` first, then one probability (a JSON number, float64) per class name in dataset.json's
order; the probabilities of an image sum to 1.

A bad request gets a 4xx whose JSON body `{"error_code": ..., "message": ...}` is short and says
what is wrong (which item, for image files), and the server goes on answering. Where MLflow itself
falls short (the model never sees the request), the test is a strict xfail naming the upstream cause.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import keras
import mlflow
import numpy as np
import pytest
import requests
from helpers import activated_environment, free_port, write_params
from PIL import Image

from alexnet8.__main__ import run_stage
from alexnet8.dataset import load_split
from alexnet8.image_classifier import MAX_IMAGES, ImageClassifier
from alexnet8.predict import predict_files, workspace_classifier
from alexnet8.preprocess import CLASS_NAMES
from alexnet8.registry import CHAMPION

pytestmark = pytest.mark.slow

REGISTERED_NAME = "alexnet8-cifar10"
STARTUP_SECONDS = 180  # importing TensorFlow and loading the model, on a loaded 2-core machine
REQUEST_SECONDS = 300  # a batch of MAX_IMAGES in 6 views while other tests share the 2 cores
SHORT = 1024  # bytes: an error body must say what is wrong without echoing the request
IMAGES = 16  # test images per good request
JSON = "application/json"


def stop(process: subprocess.Popen) -> None:
    """End the server's process group (`mlflow models serve` and the uvicorn it starts)."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=20)


class Server:
    def __init__(self, url: str, log: Path):
        self.url = url
        self.log = log
        self.session = requests.Session()

    def post(self, body: bytes | str, content_type: str | None = JSON) -> requests.Response:
        headers = {} if content_type is None else {"Content-Type": content_type}
        data = body.encode() if isinstance(body, str) else body
        return self.session.post(f"{self.url}/invocations", data=data, headers=headers, timeout=REQUEST_SECONDS)

    def predict(self, payload: dict) -> list[dict]:
        response = self.post(json.dumps(payload))
        assert response.status_code == 200, f"{response.text[:2000]}\nserver log:\n{self.log.read_text()[-5000:]}"
        return response.json()["predictions"]


TEST_TIME_VIEWS = {"evaluate.flip_tta": True, "evaluate.tta_translate": 1}
# A small AlexNet8 trained until it tells the tiny archive's classes apart (dense_units=16 or
# dropout collapse to one class at near-uniform probabilities, where a last-digit difference could
# flip the argmax).
PIPELINE = {"train.epochs": 8, "train.batch_size": 16, "train.dense_units": 64, "train.dropout": 0.0}


@pytest.fixture(scope="module")
def evaluated(prepared_dir, tmp_path_factory) -> tuple[Path, str]:
    """The train and evaluate stages, as dvc runs them, with test-time views on, into a fresh
    store: (folder, tracking URI)."""
    folder = tmp_path_factory.mktemp("served")
    tracking_uri = f"sqlite:///{folder / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
        patch.chdir(folder)  # a new store puts its artifacts in ./mlruns
        params = str(write_params(folder / "params.yaml", **PIPELINE, **TEST_TIME_VIEWS))
        common = ["--params", params, "--data", str(prepared_dir), "--run-file", "models/run.json"]
        run_stage(
            ["train", *common, "--model", "models/model.keras", "--history", "history.csv", "--metrics", "train.json"]
            + ["--checkpoints", "checkpoints"]
        )
        run_stage(
            [
                "evaluate",
                *common,
                "--model",
                "models/model.keras",
                "--metrics",
                "test.json",
                "--predictions",
                "predictions.csv",
            ]
            + ["--served-model", "models/served_model.json"]
        )
        mlflow.set_tracking_uri(None)
    return folder, tracking_uri


@pytest.fixture(scope="module")
def served_in_process(evaluated) -> ImageClassifier:
    """The trained network with the test-time views evaluate scored with, in this process."""
    folder, _ = evaluated
    views = json.loads((folder / "models/served_model.json").read_text())["views"]
    network = keras.models.load_model(folder / "models/model.keras")
    return ImageClassifier.assembled(network, list(CLASS_NAMES), views)


def test_the_champion_loaded_as_users_load_it_scores_what_the_registry_and_the_reports_say(
    evaluated, prepared_dir, monkeypatch
):
    folder, tracking_uri = evaluated
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    client = mlflow.MlflowClient()
    champion = client.get_model_version_by_alias(REGISTERED_NAME, CHAMPION)
    model = mlflow.pyfunc.load_model(f"models:/{REGISTERED_NAME}@{CHAMPION}")
    assert model.metadata.flavors["python_function"]["config"] == {"flip_tta": True, "tta_translate": 1}
    split = load_split(prepared_dir, "test")
    answered = list(model.predict(np.asarray(split.images))["class"])
    accuracy = float(np.mean(np.asarray(CLASS_NAMES)[np.asarray(split.labels)] == np.asarray(answered)))

    reported = json.loads((folder / "test.json").read_text())["test"]["accuracy"]
    evaluation_run = client.get_run(champion.run_id)
    assert accuracy == reported == evaluation_run.data.metrics["test/accuracy"]
    assert champion.tags["test/accuracy"] == f"{accuracy:.4f}"
    with open(folder / "predictions.csv") as stream:
        assert answered == [row["predicted"] for row in csv.DictReader(stream)]
    assert "predicted in 6 views (flip_tta=True, tta_translate=1)" in champion.description


@pytest.fixture(scope="module")
def server(evaluated):
    """The registered champion behind `mlflow models serve` on a free 127.0.0.1 port."""
    folder, tracking_uri = evaluated
    port = free_port()
    log = folder / "server.log"
    command = ["mlflow", "models", "serve", "-m", f"models:/{REGISTERED_NAME}@{CHAMPION}"]
    command += ["--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    command += ["-t", str(REQUEST_SECONDS)]  # the server's request timeout, 60 s by default (docs/model.md)
    with open(log, "wb") as output:
        process = subprocess.Popen(
            command,
            cwd=folder,
            env=activated_environment(MLFLOW_TRACKING_URI=tracking_uri),
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop() ends uvicorn too
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            if process.poll() is not None:
                pytest.fail(f"mlflow models serve exited ({process.returncode}):\n{log.read_text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow models serve did not answer /ping in {STARTUP_SECONDS} s:\n{log.read_text()}")
            try:
                if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.5)
        yield Server(url, log)
    finally:
        stop(process)


@pytest.fixture(scope="module")
def test_images(prepared_dir) -> np.ndarray:
    """The first test images: raw uint8 pixels, as the archive has them."""
    return np.array(load_split(prepared_dir, "test").images[:IMAGES])


def in_process(classifier: ImageClassifier, images: np.ndarray) -> tuple[list[str], np.ndarray]:
    probabilities = classifier.probabilities(images)
    return [CLASS_NAMES[index] for index in probabilities.argmax(axis=1)], probabilities


def test_the_champion_answers_with_the_in_process_models_classes_and_probabilities(
    server, served_in_process, test_images
):
    expected_classes, expected_probabilities = in_process(served_in_process, test_images)
    predictions = server.predict({"inputs": test_images.tolist()})

    assert len(predictions) == IMAGES
    for row in predictions:
        assert list(row) == ["class", *CLASS_NAMES]  # this order, nothing else
        assert isinstance(row["class"], str) and all(isinstance(row[name], float) for name in CLASS_NAMES)
    assert [row["class"] for row in predictions] == expected_classes
    probabilities = np.array([[row[name] for name in CLASS_NAMES] for row in predictions])
    np.testing.assert_allclose(probabilities.sum(axis=1), 1, rtol=1e-5)
    np.testing.assert_allclose(probabilities, expected_probabilities, atol=1e-5)
    assert len(set(expected_classes)) > 1  # a model that answers one class would prove little

    assert server.predict({"instances": test_images.tolist()}) == predictions  # the row-wise key too


def test_pixels_sent_as_floats_give_the_same_answer(server, test_images):
    as_integers = server.predict({"inputs": test_images.tolist()})
    as_floats = server.predict({"inputs": test_images.astype(np.float64).tolist()})  # 12.0, not 12
    assert [row["class"] for row in as_floats] == [row["class"] for row in as_integers]
    assert as_floats == as_integers


def test_a_batch_of_one_image_and_of_max_images_are_answered(server, test_images):
    assert len(server.predict({"inputs": test_images[:1].tolist()})) == 1
    one = json.dumps(test_images[0].tolist())
    response = server.post('{"inputs": [' + ",".join([one] * MAX_IMAGES) + "]}")
    assert response.status_code == 200 and len(response.json()["predictions"]) == MAX_IMAGES


def images_json(count: int, value: object = 0, shape: tuple[int, ...] = (32, 32, 3)) -> str:
    """`{"inputs": [...]}` of `count` images of `shape` filled with `value`, built as text: one image
    encoded once and repeated, so a batch of thousands costs no more than joining strings."""
    one = json.dumps(np.full(shape, value, dtype=object).tolist())
    return '{"inputs": [' + ",".join([one] * count) + "]}"


def test_pixels_are_whole_levels_fractions_rounded_and_the_compact_form_is_the_same(server, test_images):
    """What the module docstring of image_classifier.py tells: fractions are rounded."""
    assert server.predict(json.loads(images_json(1, 12.7))) == server.predict(json.loads(images_json(1, 13)))
    raw = [base64.b64encode(image.tobytes()).decode() for image in test_images]
    assert server.predict({"inputs": {"pixels": raw}}) == server.predict({"inputs": test_images.tolist()})


@pytest.fixture(scope="module")
def image_files(evaluated, prepared_dir, test_images) -> tuple[list[Path], list[dict]]:
    """Test images as users have them, a JPEG photo, a PNG with transparent pixels and a 16-bit
    grayscale PNG; and `python -m alexnet8.predict`'s rows for them, with the served model's views."""
    folder, _ = evaluated
    photo = Image.fromarray(test_images[0]).resize((160, 120), Image.Resampling.BICUBIC)
    rgba = np.dstack([test_images[1], np.full((32, 32), 255, np.uint8)])
    rgba[:, :8, 3] = 0  # the left quarter transparent: composited on white
    gray16 = (test_images[2].mean(axis=2) * 257).astype(np.uint16)
    paths = [folder / "photo.jpg", folder / "alpha.png", folder / "gray16.png"]
    photo.save(paths[0], quality=90)
    Image.fromarray(rgba).save(paths[1])
    Image.fromarray(gray16).save(paths[2])
    assert [Image.open(path).mode for path in paths] == ["RGB", "RGBA", "I;16"]
    classify = workspace_classifier(folder / "models/model.keras", prepared_dir, folder / "models/served_model.json")
    table, failures = predict_files([str(path) for path in paths], classify)
    assert failures == []
    return paths, table.to_dict(orient="records")


def _base64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def test_image_files_get_the_classes_predict_gives_for_the_same_files(server, image_files):
    paths, expected = image_files
    for path, row in zip(paths, expected, strict=True):
        [answer] = server.predict({"inputs": [_base64(path)]})
        assert answer["class"] == row["class"], path.name
        np.testing.assert_allclose(
            [answer[name] for name in CLASS_NAMES], [row[name] for name in CLASS_NAMES], atol=1e-6
        )
    mixed = server.predict({"inputs": [_base64(path) for path in reversed(paths)]})
    assert [answer["class"] for answer in mixed] == [row["class"] for row in reversed(expected)]


def test_bad_image_bytes_are_named_by_their_place_and_the_server_goes_on(server, image_files):
    paths, _ = image_files
    bad = base64.b64encode(b"GIF89a, but no more").decode()
    response = server.post(json.dumps({"inputs": [_base64(paths[0]), bad, _base64(paths[1])]}))
    assert response.status_code == 400 and len(response.content) < SHORT, response.text[:2000]
    assert "1 of 3 images can not be read: inputs[1]: " in response.json()["message"]
    assert len(server.predict({"inputs": [_base64(path) for path in paths]})) == 3


MISSING_CONTENT_TYPE = pytest.mark.xfail(
    strict=True,
    reason="MLflow's scoring server calls content_type.split() on a missing header (None): an "
    "AttributeError outside its error handling, so Starlette answers 500 'Internal Server Error' "
    "(mlflow/pyfunc/scoring_server/__init__.py, invocations; the 500-vs-400 family of mlflow/mlflow#4897)",
)
DEEP_NESTING = pytest.mark.xfail(
    strict=True,
    reason="MLflow's _decode_json_input catches JSONDecodeError but not the RecursionError that json.loads "
    "raises for deep nesting: Starlette answers 500 'Internal Server Error' before the model sees the request",
)
ECHOED_BODY = pytest.mark.xfail(
    strict=True,
    reason="MLflow's _decode_json_input puts the whole undecodable body into its message "
    "('Input: \\n{json_input}'): a broken 64-image request comes back as ~1 MB",
)

# name: (the body, built when the test runs; content type or None for no header; expected status; what the message says)
SHAPE = "expected images of shape (n, 32, 32, 3), got shape"
BAD_REQUESTS = {
    "shape (1, 32, 32)": (lambda: images_json(1, shape=(32, 32)), JSON, 400, f"{SHAPE} (1, 32, 32)"),
    "shape (1, 28, 28, 3)": (lambda: images_json(1, shape=(28, 28, 3)), JSON, 400, f"{SHAPE} (1, 28, 28, 3)"),
    "one image, no batch": (
        lambda: f'{{"inputs": {json.dumps(np.zeros((32, 32, 3), int).tolist())}}}',
        JSON,
        400,
        f"{SHAPE} (32, 32, 3)",
    ),
    "strings": (lambda: images_json(1, "abc"), JSON, 400, "expected pixels as numbers from 0 to 255, got <U3"),
    "numeric strings": (lambda: images_json(1, "12"), JSON, 400, "expected pixels as numbers from 0 to 255, got <U2"),
    "NaN": (lambda: images_json(1, float("nan")), JSON, 400, "values outside that range (or NaN)"),
    "300": (lambda: images_json(1, 300), JSON, 400, "expected pixels from 0 to 255, got values outside that range"),
    "-1": (lambda: images_json(1, -1), JSON, 400, "expected pixels from 0 to 255, got values outside that range"),
    # 10,000 images as JSON integers take ~45 s to refuse (MLflow parses and copies the whole body first).
    "MAX_IMAGES + 1 images": (
        lambda: images_json(MAX_IMAGES + 1),
        JSON,
        400,
        f"expected 1 to {MAX_IMAGES} images per request, got {MAX_IMAGES + 1}",
    ),
    "an empty batch": (lambda: images_json(0), JSON, 400, f"expected 1 to {MAX_IMAGES} images per request, got 0"),
    "not base64": (lambda: '{"inputs": ["photo.jpg"]}', JSON, 400, "inputs[0]: not base64 text"),
    "raw pixels, 4 bytes": (lambda: '{"inputs": {"pixels": ["AAAAAA=="]}}', JSON, 400, "inputs.pixels[0]: 4 bytes"),
    "malformed JSON": (lambda: '{"inputs": [[[', JSON, 400, "Ensure that input is a valid JSON"),
    "malformed JSON, 64 images": (lambda: images_json(64)[:-1], JSON, 400, "Ensure that input is a valid JSON"),
    "nested 100,000 deep": (lambda: '{"inputs": ' + "[" * 100_000 + "]" * 100_000 + "}", JSON, 400, "nested"),
    "text/plain": (lambda: images_json(1), "text/plain", 415, "only supports the following content types"),
    "no content type": (lambda: images_json(1), None, 415, "content type"),
}
EXPECTED_FAILURES = {
    "no content type": MISSING_CONTENT_TYPE,
    "malformed JSON, 64 images": ECHOED_BODY,
    "nested 100,000 deep": DEEP_NESTING,
}


@pytest.mark.parametrize(
    ("body", "content_type", "status", "says"),
    [pytest.param(*case, id=name, marks=EXPECTED_FAILURES.get(name, ())) for name, case in BAD_REQUESTS.items()],
)
def test_a_bad_request_gets_a_short_4xx_and_the_server_goes_on(server, test_images, body, content_type, status, says):
    response = server.post(body(), content_type=content_type)
    assert response.status_code == status, response.text[:2000]
    assert len(response.content) < SHORT, (
        f"{len(response.content)} bytes: {response.text[:300]}...{response.text[-300:]}"
    )
    message = response.json()["message"] if "json" in response.headers["content-type"] else response.text
    assert says in message, message
    assert len(server.predict({"inputs": test_images[:1].tolist()})) == 1


def test_the_server_still_answers_after_all_the_bad_requests(server, served_in_process, test_images):
    for body, content_type, _, _ in BAD_REQUESTS.values():  # sent here too: this test needs no other
        # The server may close the connection before an oversized body is sent whole.
        with contextlib.suppress(requests.ConnectionError):
            server.post(body(), content_type=content_type)
    expected_classes, _ = in_process(served_in_process, test_images)
    assert [row["class"] for row in server.predict({"inputs": test_images.tolist()})] == expected_classes
