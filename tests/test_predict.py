"""`python -m alexnet8.predict`: real image files of every common kind, broken ones, both model sources."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import keras
import mlflow
import numpy as np
import pytest
from helpers import PROJECT_ROOT
from mlflow.exceptions import MlflowException
from PIL import Image

from alexnet8 import cli, predict
from alexnet8.dataset import DATASET_FILE
from alexnet8.errors import DataError
from alexnet8.image_classifier import images_pixels, view_config
from alexnet8.network import build_alexnet8
from alexnet8.served_model import log_classifier

CLASS_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
GOOD = ["photo.jpg", "gray.png", "rgba.png", "palette.png", "cmyk.jpg", "gray16.png", "exact.png"]
BAD = ["notes.png", "truncated.jpg", "folder", "missing.png"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny untrained AlexNet8 saved as the train stage saves it, and a dataset.json naming the
    classes: (model path, prepared folder)."""
    folder = tmp_path_factory.mktemp("workspace")
    keras.utils.set_random_seed(0)
    model_path = folder / "model.keras"
    build_alexnet8(dense_units=16).save(model_path)
    prepared = folder / "prepared"
    prepared.mkdir()
    description = {
        "class_names": CLASS_NAMES,
        "sizes": {"train": 0, "validation": 0, "test": 0},
        "normalization": {"name": "unit"},
        "archive_md5": "0" * 32,
        "seed": 0,
    }
    (prepared / DATASET_FILE).write_text(json.dumps(description))
    return model_path, prepared


@pytest.fixture(scope="module")
def classify(workspace):
    return predict.workspace_classifier(*workspace)


def _noise(height: int, width: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    shape = (height, width, channels) if channels > 1 else (height, width)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


@pytest.fixture(scope="module")
def exact_pixels() -> np.ndarray:
    """The pixels of exact.png, a 32 x 32 RGB PNG."""
    return _noise(32, 32, seed=7)


@pytest.fixture(scope="module")
def images(tmp_path_factory, exact_pixels) -> Path:
    """A folder with one file of each GOOD kind and each BAD kind (BAD's missing.png is absent)."""
    folder = tmp_path_factory.mktemp("images")
    Image.fromarray(_noise(375, 500)).save(folder / "photo.jpg", quality=90)
    Image.fromarray(_noise(40, 60, channels=1)).save(folder / "gray.png")
    Image.fromarray(_noise(48, 48, channels=4)).save(folder / "rgba.png")
    Image.fromarray(_noise(50, 40)).quantize(16).save(folder / "palette.png")
    Image.fromarray(_noise(64, 64)).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(np.arange(64 * 80, dtype=np.uint16).reshape(64, 80) * 12).save(folder / "gray16.png")
    Image.fromarray(exact_pixels).save(folder / "exact.png")
    (folder / "notes.png").write_text("not an image\n")
    whole = (folder / "photo.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (folder / "folder").mkdir()
    assert {name: Image.open(folder / name).mode for name in GOOD} == {
        "photo.jpg": "RGB",
        "gray.png": "L",
        "rgba.png": "RGBA",
        "palette.png": "P",
        "cmyk.jpg": "CMYK",
        "gray16.png": "I;16",
        "exact.png": "RGB",
    }
    return folder


def _paths(folder: Path, names: list[str]) -> list[str]:
    return [str(folder / name) for name in names]


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as stream:
        return list(csv.DictReader(stream))


# --- reading and converting ---------------------------------------------------------------


def test_a_32x32_rgb_png_is_the_models_input_pixel_for_pixel(images, exact_pixels):
    pixels, composited = predict.read_image(images / "exact.png")
    assert pixels.dtype == np.uint8 and not composited
    np.testing.assert_array_equal(pixels, exact_pixels)


def test_every_kind_of_image_becomes_32x32_rgb(images):
    for name in GOOD:
        pixels, _ = predict.read_image(images / name)
        assert (pixels.shape, pixels.dtype) == ((32, 32, 3), np.uint8), name
    gray, _ = predict.read_image(images / "gray.png")
    assert np.array_equal(gray[..., 0], gray[..., 1]) and np.array_equal(gray[..., 1], gray[..., 2])


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
    for value, expected in [(0, 0), (257 * 100, 100), (65535, 255)]:
        Image.fromarray(np.full((40, 40), value, dtype=np.uint16)).save(tmp_path / "gray16.png")
        pixels, _ = predict.read_image(tmp_path / "gray16.png")
        assert np.all(pixels == expected), value


def test_transparent_pixels_are_composited_on_white_and_said_so(tmp_path):
    rgba = np.zeros((32, 32, 4), dtype=np.uint8)
    rgba[..., 0] = 200  # red where opaque
    rgba[:, 16:, 3] = 255  # the left half fully transparent
    Image.fromarray(rgba).save(tmp_path / "half.png")
    pixels, composited = predict.read_image(tmp_path / "half.png")
    assert composited
    assert np.all(pixels[:, :16] == 255) and np.all(pixels[:, 16:] == [200, 0, 0])

    rgba[..., 3] = 255  # an alpha channel, but nothing transparent: nothing to say
    Image.fromarray(rgba).save(tmp_path / "opaque.png")
    assert not predict.read_image(tmp_path / "opaque.png")[1]

    palette = Image.new("P", (32, 32), 0)
    palette.putpalette([0, 0, 255, 0, 255, 0])
    palette.paste(1, (0, 0, 32, 16))
    palette.save(tmp_path / "palette.png", transparency=0)  # colour 0 (blue, the bottom half) transparent
    pixels, composited = predict.read_image(tmp_path / "palette.png")
    assert composited and np.all(pixels[:16] == [0, 255, 0]) and np.all(pixels[16:] == 255)


def test_cmyk_is_converted_to_rgb(tmp_path):
    Image.new("CMYK", (40, 40), (0, 255, 255, 0)).save(tmp_path / "red.jpg", quality=100)
    pixels, _ = predict.read_image(tmp_path / "red.jpg")
    assert np.all(np.abs(pixels.astype(int) - [255, 0, 0]) <= 2)


def test_a_wide_image_is_center_cropped_to_a_square_then_averaged_down(tmp_path):
    wide = np.zeros((64, 96, 3), dtype=np.uint8)
    wide[:, 16:80] = [10, 20, 30]  # the central 64 x 64 square; the 16 columns either side are black
    wide[::2, 16:80] = [30, 40, 50]  # every other row brighter: BOX averages each 2 x 2 block
    Image.fromarray(wide).save(tmp_path / "wide.png")
    pixels, _ = predict.read_image(tmp_path / "wide.png")
    assert np.all(pixels == [20, 30, 40])


def test_exif_orientation_turns_a_photo_upright(tmp_path):
    stored = np.zeros((32, 64, 3), dtype=np.uint8)
    stored[:, 32:] = 255  # stored landscape: black left, white right
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": 64 high, black above white
    Image.fromarray(stored).save(tmp_path / "phone.png", exif=exif)
    Image.fromarray(stored).save(tmp_path / "plain.png")
    upright, _ = predict.read_image(tmp_path / "phone.png")  # the crop is the middle 32 rows
    assert np.all(upright[:16] == 0) and np.all(upright[16:] == 255)
    plain, _ = predict.read_image(tmp_path / "plain.png")  # 64 x 32 crop: the middle, black then white columns
    assert np.all(plain[:, :16] == 0) and np.all(plain[:, 16:] == 255)


def test_unreadable_files_are_named_with_their_problem(images):
    expected = {
        "notes.png": "not an image file",
        "truncated.jpg": "truncated",
        "folder": "is a directory",
        "missing.png": "no such file",
    }
    for name, problem in expected.items():
        with pytest.raises(predict.UnreadableImage, match=problem) as raised:
            predict.read_image(images / name)
        assert str(raised.value).startswith(str(images / name))


def _png_header(width: int, height: int) -> bytes:
    """An RGB PNG of that size without pixel data: all Pillow reads before refusing a huge image."""

    def chunk(kind: bytes, data: bytes = b"") -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT") + chunk(b"IEND")


def test_a_huge_image_is_too_large_with_the_limit_said_in_predict_and_in_the_served_model(tmp_path):
    (tmp_path / "huge.png").write_bytes(_png_header(20000, 20000))
    too_large = "image too large: 400,000,000 pixels, the limit is 178,956,970 pixels"
    with pytest.raises(predict.UnreadableImage, match=f"huge.png: {too_large}"):
        predict.read_image(tmp_path / "huge.png")
    with pytest.raises(MlflowException, match=rf"inputs\[0\]: {too_large}") as raised:
        images_pixels([(tmp_path / "huge.png").read_bytes()])
    assert raised.value.get_http_status_code() == 400


# --- predicting -----------------------------------------------------------------------------


def test_every_good_file_gets_a_class_and_probabilities_summing_to_one(images, classify):
    table, failures = predict.predict_files(_paths(images, GOOD), classify)
    assert failures == []
    assert list(table.columns) == ["file", "class", "probability", *CLASS_NAMES]
    assert list(table["file"]) == _paths(images, GOOD)
    assert set(table["class"]) <= set(CLASS_NAMES)
    probabilities = table[CLASS_NAMES].to_numpy()
    np.testing.assert_allclose(probabilities.sum(axis=1), 1, rtol=1e-5)
    assert list(table["class"]) == [CLASS_NAMES[index] for index in probabilities.argmax(axis=1)]
    np.testing.assert_array_equal(table["probability"], probabilities.max(axis=1))


def test_the_32x32_png_is_predicted_exactly_as_its_pixels(images, exact_pixels, workspace, classify):
    table, _ = predict.predict_files(_paths(images, ["exact.png"]), classify)
    network = keras.models.load_model(workspace[0])
    expected = np.asarray(network.predict_on_batch(exact_pixels[None])).astype(np.float64)
    np.testing.assert_array_equal(table[CLASS_NAMES].to_numpy(), expected)


def test_bad_files_are_logged_by_name_and_the_good_ones_still_predicted(images, classify, caplog):
    names = ["notes.png", "photo.jpg", "truncated.jpg", "gray.png", "folder", "missing.png"]
    with caplog.at_level(logging.ERROR, logger="alexnet8"):
        table, failures = predict.predict_files(_paths(images, names), classify)
    assert list(table["file"]) == _paths(images, ["photo.jpg", "gray.png"])
    assert len(failures) == len(BAD)
    for name in BAD:
        assert str(images / name) in caplog.text, name


def test_files_are_predicted_a_batch_at_a_time(images, classify):
    sizes = []

    def counting(pixels):
        sizes.append(len(pixels))
        return classify(pixels)

    table, _ = predict.predict_files(_paths(images, GOOD + ["notes.png"]), counting, batch_size=3)
    assert sizes == [3, 3, 1]  # notes.png, the 8th file, is in the third batch but unreadable
    whole, _ = predict.predict_files(_paths(images, GOOD), classify)
    assert list(table["class"]) == list(whole["class"])
    np.testing.assert_allclose(table[CLASS_NAMES], whole[CLASS_NAMES], rtol=1e-5, atol=1e-7)


def test_the_table_is_aligned():
    table = predict.pd.DataFrame(
        {"file": ["a.png", "longer/name.jpg"], "class": ["cat", "airplane"], "probability": [0.5, 0.123456]}
    )
    assert predict.format_table(table).splitlines() == [
        "file             class     probability",
        "a.png            cat            0.5000",
        "longer/name.jpg  airplane       0.1235",
    ]


def test_out_writes_the_csv_and_stdout_the_table(images, workspace, tmp_path, capsys):
    out = tmp_path / "predictions.csv"
    model, data = workspace
    predict.main(["--model", str(model), "--data", str(data), "--out", str(out), *_paths(images, GOOD)])
    rows = _csv_rows(out)
    assert list(rows[0]) == ["file", "class", "probability", *CLASS_NAMES]
    assert [row["file"] for row in rows] == _paths(images, GOOD)
    for row in rows:
        probabilities = {name: float(row[name]) for name in CLASS_NAMES}
        assert float(row["probability"]) == probabilities[row["class"]] == max(probabilities.values())
        assert sum(probabilities.values()) == pytest.approx(1, rel=1e-5)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["file", "class", "probability"]
    assert [line.split() for line in lines[1:]] == [
        [row["file"], row["class"], f"{float(row['probability']):.4f}"] for row in rows
    ]


def test_no_readable_file_exits_1_and_writes_no_csv(images, workspace, tmp_path, capsys):
    out = tmp_path / "predictions.csv"
    model, data = workspace
    with pytest.raises(SystemExit) as exited:
        cli.run(predict.main, ["--model", str(model), "--data", str(data), "--out", str(out), *_paths(images, BAD)])
    assert exited.value.code == 1
    assert not out.exists() and capsys.readouterr().out == ""


def test_a_missing_model_or_dataset_json_is_a_clear_error(workspace, tmp_path):
    model, data = workspace
    with pytest.raises(DataError, match="run the train stage first"):
        predict.workspace_classifier(tmp_path / "model.keras", data)
    with pytest.raises(DataError, match="run the preprocess stage first"):
        predict.workspace_classifier(model, tmp_path)


def test_model_uri_replaces_model_and_data(capsys):
    with pytest.raises(SystemExit) as exited:
        predict.main(["--model-uri", "models:/x@champion", "--model", "m.keras", "a.png"])
    assert exited.value.code == 2 and "--model-uri replaces --model" in capsys.readouterr().err


def test_an_mlflow_model_uri_gives_what_the_keras_file_gives(images, workspace, tmp_path):
    """The tiny model logged and registered as the evaluate stage does, then predicted by alias."""
    model, data = workspace
    mlflow.set_experiment("predict")  # not an experiment another test left active in another store
    with mlflow.start_run():
        logged = log_classifier(
            model,
            data / DATASET_FILE,
            CLASS_NAMES,
            view_config(),
            np.zeros((2, 32, 32, 3), np.uint8),
            "tiny",
            params={},
            registered_model_name="alexnet8-tiny",
        )
    mlflow.MlflowClient().set_registered_model_alias("alexnet8-tiny", "champion", logged.registered_model_version)
    files = _paths(images, GOOD)
    predict.main(["--model", str(model), "--data", str(data), "--out", str(tmp_path / "keras.csv"), *files])
    for uri in ("models:/alexnet8-tiny@champion", logged.model_uri):
        out = tmp_path / "mlflow.csv"
        predict.main(["--model-uri", uri, "--out", str(out), *files])
        from_keras, from_mlflow = _csv_rows(tmp_path / "keras.csv"), _csv_rows(out)
        assert [row["class"] for row in from_mlflow] == [row["class"] for row in from_keras], uri
        assert [row["file"] for row in from_mlflow] == files
        np.testing.assert_allclose(
            [[float(row[name]) for name in CLASS_NAMES] for row in from_mlflow],
            [[float(row[name]) for name in CLASS_NAMES] for row in from_keras],
            rtol=1e-6,
        )


def test_the_command_prints_the_table_names_the_bad_files_and_exits_1(images, workspace, tmp_path):
    model, data = workspace
    out = tmp_path / "predictions.csv"
    environment = os.environ | {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT / "src"), os.environ.get("PYTHONPATH")])),
        "ALEXNET8_LOG_LEVEL": "INFO",
    }
    arguments = ["--model", str(model), "--data", str(data), "--out", str(out), *_paths(images, GOOD + BAD)]
    result = subprocess.run(
        [sys.executable, "-m", "alexnet8.predict", *arguments],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1, result.stderr
    rows = list(csv.reader(io.StringIO(result.stdout), delimiter=" ", skipinitialspace=True))
    assert rows[0] == ["file", "class", "probability"]
    assert [row[0] for row in rows[1:]] == _paths(images, GOOD)
    assert all(row[1] in CLASS_NAMES and 0 < float(row[2]) <= 1 for row in rows[1:])
    for name in BAD:
        assert str(images / name) in result.stderr, name
    assert "4 of 11 file(s) could not be read" in result.stderr and "Traceback" not in result.stderr
    assert [row["file"] for row in _csv_rows(out)] == _paths(images, GOOD)
