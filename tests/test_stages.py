"""train -> evaluate -> plot on tiny prepared data: files written and what MLflow recorded."""

from __future__ import annotations

import csv
import json

import keras
import mlflow
import numpy as np
import pytest
from helpers import write_params

from alexnet8.errors import PipelineError
from alexnet8.evaluate import main as evaluate_main
from alexnet8.plot import main as plot_main
from alexnet8.train import main as train_main

SMALL = {"train.epochs": 2, "train.batch_size": 16, "train.dense_units": 64}


@pytest.fixture(scope="module")
def pipeline_outputs(prepared_dir, tmp_path_factory):
    """Run the three stages' main() once, as dvc would, into a fresh folder and MLflow store."""
    folder = tmp_path_factory.mktemp("run")
    tracking_uri = f"sqlite:///{folder / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
        patch.chdir(folder)  # a new store puts its artifacts in ./mlruns
        params = write_params(folder / "params.yaml", **SMALL)
        paths = {
            name: folder / relative
            for name, relative in {
                "model": "models/model.keras",
                "run_file": "models/run.json",
                "history": "reports/history.csv",
                "train_metrics": "reports/train.json",
                "test_metrics": "reports/test.json",
                "predictions": "reports/predictions.csv",
                "curves": "reports/curves.png",
                "confusion": "reports/confusion.png",
            }.items()
        }
        common = ["--data", str(prepared_dir), "--run-file", str(paths["run_file"])]
        train_main(
            [
                "--params",
                str(params),
                *common,
                "--model",
                str(paths["model"]),
                "--history",
                str(paths["history"]),
                "--metrics",
                str(paths["train_metrics"]),
                "--checkpoints",
                str(folder / "checkpoints"),
            ]
        )
        evaluate_main(
            [
                "--params",
                str(params),
                *common,
                "--model",
                str(paths["model"]),
                "--metrics",
                str(paths["test_metrics"]),
                "--predictions",
                str(paths["predictions"]),
            ]
        )
        plot_main(
            [
                *common,
                "--history",
                str(paths["history"]),
                "--predictions",
                str(paths["predictions"]),
                "--curves",
                str(paths["curves"]),
                "--confusion",
                str(paths["confusion"]),
            ]
        )
    return paths, tracking_uri


def test_stages_write_their_files(pipeline_outputs):
    paths, _ = pipeline_outputs
    with open(paths["history"]) as stream:
        rows = list(csv.DictReader(stream))
    assert [row["epoch"] for row in rows] == ["0", "1"]
    assert set(rows[0]) == {"epoch", "accuracy", "loss", "val_accuracy", "val_loss"}
    test_metrics = json.loads(paths["test_metrics"].read_text())
    assert (
        set(test_metrics) == {"accuracy", "loss", "per_class_accuracy"}
        and len(test_metrics["per_class_accuracy"]) == 10
    )
    with open(paths["predictions"]) as stream:
        assert len(list(csv.DictReader(stream))) == 40
    for figure in ("curves", "confusion"):
        assert paths[figure].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert keras.models.load_model(paths["model"]).count_params() > 0
    leftovers = [path for path in paths["model"].parent.parent.rglob(".*") if path.is_file()]
    assert leftovers == []  # no temporary files left behind


def test_mlflow_has_params_per_epoch_metrics_test_metrics_figures_and_model(pipeline_outputs, prepared_dir):
    paths, tracking_uri = pipeline_outputs
    run_id = json.loads(paths["run_file"].read_text())["run_id"]
    client = mlflow.MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.epochs"] == "2" and run.data.params["train.learning_rate"] == "0.001"
    assert run.data.tags["data.archive_md5"] == json.loads((prepared_dir / "dataset.json").read_text())["archive_md5"]
    for metric in ("accuracy", "loss", "val_accuracy", "val_loss"):
        assert [point.step for point in client.get_metric_history(run_id, metric)] == [0, 1], metric
    test_metrics = json.loads(paths["test_metrics"].read_text())
    assert run.data.metrics["test_accuracy"] == pytest.approx(test_metrics["accuracy"])
    assert run.data.metrics["test_loss"] == pytest.approx(test_metrics["loss"])
    assert not any(name.startswith("validation_") for name in run.data.metrics)  # no duplicate step-0 copies
    artifacts = {artifact.path for artifact in client.list_artifacts(run_id, "figures")}
    assert artifacts == {"figures/curves.png", "figures/confusion.png"}

    mlflow.set_tracking_uri(tracking_uri)
    [logged] = mlflow.search_logged_models(
        filter_string=f"source_run_id = '{run_id}'", experiment_ids=[run.info.experiment_id], output_format="list"
    )
    images = np.random.default_rng(0).random((3, 32, 32, 3), dtype=np.float32)
    probabilities = mlflow.pyfunc.load_model(logged.model_uri).predict(images)
    assert np.asarray(probabilities).shape == (3, 10)
    assert (
        mlflow.keras.load_model(logged.model_uri).count_params()
        == keras.models.load_model(paths["model"]).count_params()
    )
    signature = mlflow.models.get_model_info(logged.model_uri).signature
    assert signature.inputs.to_dict()[0]["tensor-spec"]["shape"] == (-1, 32, 32, 3)


def test_later_stages_without_a_run_file_say_which_stage_to_run(prepared_dir, tmp_path):
    params = write_params(tmp_path / "params.yaml", **SMALL)
    with pytest.raises(PipelineError, match="not found: run the train stage first"):
        evaluate_main(
            [
                "--params",
                str(params),
                "--data",
                str(prepared_dir),
                "--run-file",
                str(tmp_path / "missing.json"),
                "--model",
                str(tmp_path / "missing.keras"),
                "--metrics",
                str(tmp_path / "m.json"),
                "--predictions",
                str(tmp_path / "p.csv"),
            ]
        )


def test_a_registered_model_name_registers_a_new_version_per_run():
    from alexnet8.mlflow_keras import log_model
    from alexnet8.model import build_alexnet8

    model = build_alexnet8(dense_units=8)
    images = np.zeros((2, 32, 32, 3), dtype=np.float32)
    mlflow.set_experiment("registration")  # not an experiment another test left active in another store
    for _ in range(2):
        with mlflow.start_run():
            log_model(model, images, registered_model_name="alexnet8-cifar10")
    versions = mlflow.MlflowClient().search_model_versions("name = 'alexnet8-cifar10'")
    assert sorted(int(version.version) for version in versions) == [1, 2]
