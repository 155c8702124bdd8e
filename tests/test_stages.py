"""train -> evaluate -> plot on tiny prepared data: files written and what MLflow recorded."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from unittest.mock import ANY

import keras
import mlflow
import numpy as np
import pytest
from helpers import write_params

from alexnet8 import cli
from alexnet8.__main__ import run_stage
from alexnet8.dataset import load_description, load_split
from alexnet8.errors import PipelineError
from alexnet8.metric_names import EPOCH_METRICS
from alexnet8.network import weights_digest
from alexnet8.runtime import cpu_features, machine_facts, xla_choice
from alexnet8.tracking import RUNS_VIEW_TAG, runs_page_url

SMALL = {"train.epochs": 2, "train.batch_size": 16, "train.dense_units": 64}


@pytest.fixture(scope="module")
def pipeline_outputs(prepared_dir, tmp_path_factory):
    """Run the three stages' main() once, as dvc would, into a fresh folder and MLflow store."""
    folder = tmp_path_factory.mktemp("run")
    tracking_uri = f"sqlite:///{folder / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
        patch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")  # a tiny training lasts seconds
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
                "served_model": "models/served_model.json",
                "curves": "reports/curves.png",
                "confusion": "reports/confusion.png",
            }.items()
        }
        common = ["--data", str(prepared_dir), "--run-file", str(paths["run_file"])]
        run_stage(
            [
                "train",
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
        run_stage(
            [
                "evaluate",
                "--params",
                str(params),
                *common,
                "--model",
                str(paths["model"]),
                "--metrics",
                str(paths["test_metrics"]),
                "--predictions",
                str(paths["predictions"]),
                "--served-model",
                str(paths["served_model"]),
            ]
        )
        run_stage(
            [
                "plot",
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
    assert [row["epoch"] for row in rows] == ["1", "2"]  # epochs are numbered from 1
    assert list(rows[0]) == ["epoch", *EPOCH_METRICS]
    test_metrics = json.loads(paths["test_metrics"].read_text())
    assert test_metrics == {"test": {"accuracy": ANY, "loss": ANY}, "val_served": {"accuracy": ANY}}
    # Without test-time augmentation, evaluate's validation accuracy is the last epoch's.
    assert test_metrics["val_served"]["accuracy"] == pytest.approx(float(rows[-1]["val/accuracy"]), abs=1e-6)
    with open(paths["predictions"]) as stream:
        assert len(list(csv.DictReader(stream))) == 40
    for figure in ("curves", "confusion"):
        assert paths[figure].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert keras.models.load_model(paths["model"]).count_params() > 0
    leftovers = [path for path in paths["model"].parent.parent.rglob(".*") if path.is_file()]
    assert leftovers == []  # no temporary files left behind


def test_the_training_run_has_its_params_per_epoch_metrics_figures_and_provenance(pipeline_outputs, prepared_dir):
    paths, tracking_uri = pipeline_outputs
    run_id = json.loads(paths["run_file"].read_text())["run_id"]
    client = mlflow.MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.epochs"] == "2" and run.data.params["train.learning_rate"] == "0.001"
    # What `jit_compile: auto` became on this machine, decided by its CPU's features.
    expected_xla = xla_choice("auto", cpu_features(), has_gpu=False)
    assert run.data.params["train.jit_compile"] == "auto" and run.data.params["derived.jit_compile"] == str(
        expected_xla
    )
    assert run.data.tags["data.archive_md5"] == json.loads((prepared_dir / "dataset.json").read_text())["archive_md5"]
    for metric in EPOCH_METRICS:
        assert [point.step for point in client.get_metric_history(run_id, metric)] == [1, 2], metric
    assert not [name for name in run.data.params if name.startswith("evaluate.")]  # the evaluation's own
    # MLflow's system metrics, sampled while training ran (its System metrics tab).
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(run.data.metrics)
    assert not any(name.startswith(("test_", "validation_")) for name in run.data.metrics)
    artifacts = {artifact.path for artifact in client.list_artifacts(run_id)}
    assert {"curves.png", "confusion.png"} <= artifacts  # at the root, where Compare shows them

    assert not [name for name in run.data.params if name.startswith("optimizer_")]  # train.* says it all
    assert json.loads(run.data.tags["data.sizes"]) == {"train": 90, "validation": 10, "test": 40}
    assert "dvc.experiment" not in run.data.tags  # not run by `dvc exp run`
    # What `make reproduce` compares: the saved weights, and the machine facts that decide bit-identity.
    assert run.data.tags["weights.sha256"] == weights_digest(keras.models.load_model(paths["model"]))
    assert {key: run.data.tags[key] for key in machine_facts()} == machine_facts()
    [dataset] = run.inputs.dataset_inputs
    assert (dataset.dataset.name, dataset.dataset.digest) == ("cifar-10", run.data.tags["data.archive_md5"])
    logged_description = json.loads(Path(client.download_artifacts(run_id, "provenance/dataset.json")).read_text())
    assert logged_description == json.loads((prepared_dir / "dataset.json").read_text())
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_the_evaluation_is_its_own_run_under_the_training_with_its_params_and_metrics(pipeline_outputs):
    paths, tracking_uri = pipeline_outputs
    training_run_id = json.loads(paths["run_file"].read_text())["run_id"]
    served = json.loads(paths["served_model"].read_text())
    client = mlflow.MlflowClient(tracking_uri)
    evaluation = client.get_run(served["run_id"])
    assert evaluation.info.status == "FINISHED" and served["training_run_id"] == training_run_id
    assert evaluation.data.tags["mlflow.parentRunId"] == training_run_id
    assert evaluation.data.params["evaluate.flip_tta"] == "False"
    test_metrics = json.loads(paths["test_metrics"].read_text())
    # The metrics file's headline numbers, under MLflow's form of the same names; and the rest.
    assert evaluation.data.metrics.keys() == {"test/accuracy", "test/loss", "val_served/accuracy", "val_served/loss"}
    assert evaluation.data.metrics["test/accuracy"] == test_metrics["test"]["accuracy"]
    assert evaluation.data.metrics["val_served/accuracy"] == test_metrics["val_served"]["accuracy"]
    per_class = json.loads(Path(client.download_artifacts(served["run_id"], "test_per_class.json")).read_text())
    assert per_class["columns"] == ["class", "test images", "accuracy"] and len(per_class["data"]) == 10


def test_the_logged_model_takes_raw_pixels_and_answers_with_class_names(pipeline_outputs, prepared_dir):
    paths, tracking_uri = pipeline_outputs
    served = json.loads(paths["served_model"].read_text())
    mlflow.set_tracking_uri(tracking_uri)
    logged = mlflow.get_logged_model(served["model_id"])
    assert logged.source_run_id == served["run_id"] and logged.name == "adam-lr0_001-b16-e2-unit"
    assert logged.params["evaluate.tta_translate"] == "0" and served["views"] == {"flip_tta": False, "tta_translate": 0}
    assert {"test/accuracy", "val_served/accuracy"} <= {metric.key for metric in logged.metrics}
    # The logged model names the data its metrics came from (MLflow's "Datasets used").
    assert {(metric.dataset_name, metric.dataset_digest) for metric in logged.metrics} == {
        ("cifar-10", load_description(prepared_dir).archive_md5)
    }

    classifier = mlflow.pyfunc.load_model(served["model_uri"])
    test_images = load_split(prepared_dir, "test").images[:8]  # the archive's raw uint8 pixels
    table = classifier.predict(np.asarray(test_images))
    class_names = load_description(prepared_dir).class_names
    assert list(table.columns) == ["class", *class_names]
    np.testing.assert_allclose(table[class_names].sum(axis=1), 1, rtol=1e-5)
    with open(paths["predictions"]) as stream:
        expected = [row["predicted"] for row in csv.DictReader(stream)][:8]
    assert list(table["class"]) == expected  # the same model as `evaluate` scored
    # No input schema: it takes pixels and image files (served_model.classifier_signature says why).
    assert classifier.metadata.signature.inputs is None
    assert classifier.metadata.signature.outputs.input_names() == ["class", *class_names]


def test_each_evaluation_registers_a_version_that_is_the_candidate_and_the_first_champion(pipeline_outputs):
    paths, tracking_uri = pipeline_outputs
    served = json.loads(paths["served_model"].read_text())
    client = mlflow.MlflowClient(tracking_uri)
    version = client.get_model_version_by_alias("alexnet8-cifar10", "champion")
    assert str(version.version) == served["version"] == "1" and version.aliases == ["candidate", "champion"]
    assert version.tags["champion.compared_with"] == "no champion before"
    assert version.run_id == served["run_id"]
    accuracy = json.loads(paths["test_metrics"].read_text())["test"]["accuracy"]
    assert version.tags["test/accuracy"] == f"{accuracy:.4f}" and int(version.tags["test/images"]) == 40
    assert "uint8 RGB pixels 0-255, shape (n, 32, 32, 3)" in version.description


def test_later_stages_without_a_run_file_say_which_stage_to_run(prepared_dir, tmp_path):
    params = write_params(tmp_path / "params.yaml", **SMALL)
    with pytest.raises(PipelineError, match="not found: run the train stage first"):
        run_stage(
            [
                "evaluate",
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
                "--served-model",
                str(tmp_path / "s.json"),
            ]
        )


@pytest.mark.parametrize(
    "content, problem", [("{", "file: Invalid JSON"), ('{"experiment_id": "1"}', "run_id: Field required")]
)
@pytest.mark.parametrize("stage", ["evaluate", "plot"])
def test_a_damaged_run_file_is_named_and_nothing_is_written(prepared_dir, tmp_path, stage, content, problem):
    run_file, outputs = tmp_path / "run.json", tmp_path / "outputs"
    run_file.write_text(content)
    params = ["--params", str(write_params(tmp_path / "params.yaml", **SMALL))] if stage == "evaluate" else []
    paths = [str(outputs / option) for option in cli.STAGES[stage].options]
    arguments = [item for pair in zip(cli.STAGES[stage].options, paths, strict=True) for item in pair]
    arguments += ["--run-file", str(run_file), "--data", str(prepared_dir)]  # the last of each option wins
    with pytest.raises(PipelineError) as error:
        run_stage([stage, *params, *arguments])
    assert str(error.value).startswith(f"{run_file}: not a run file written by the train stage (")
    assert problem in str(error.value)
    assert not outputs.exists()


def test_a_damaged_dataset_description_is_named_and_nothing_is_written(prepared_dir, tmp_path):
    description = json.loads((prepared_dir / "dataset.json").read_text())
    del description["normalization"]
    (tmp_path / "prepared").mkdir()
    (tmp_path / "prepared" / "dataset.json").write_text(json.dumps(description))
    outputs = tmp_path / "outputs"
    arguments = [item for option in cli.STAGES["train"].options for item in (option, str(outputs / option))]
    params = write_params(tmp_path / "params.yaml", **SMALL)
    with pytest.raises(PipelineError) as error:
        run_stage(["train", "--params", str(params), *arguments, "--data", str(tmp_path / "prepared")])
    assert str(error.value).startswith(f"{tmp_path / 'prepared' / 'dataset.json'}: not a description written by")
    assert "normalization: Field required" in str(error.value)
    assert not outputs.exists()


def test_the_ui_address_opens_the_runs_table_with_columns_the_runs_fill(pipeline_outputs):
    """`make ui`'s address: model-training mode, and a view whose every column is a metric or param
    that the training run or its evaluation holds (a misspelt column would show empty)."""
    paths, tracking_uri = pipeline_outputs
    client = mlflow.MlflowClient(tracking_uri)
    training = client.get_run(json.loads(paths["run_file"].read_text())["run_id"])
    evaluation = client.get_run(json.loads(paths["served_model"].read_text())["run_id"])
    experiment = client.get_experiment(training.info.experiment_id)
    view = json.loads(experiment.tags[RUNS_VIEW_TAG])
    logged = {f"metrics.`{name}`" for run in (training, evaluation) for name in run.data.metrics}
    logged |= {f"params.`{name}`" for run in (training, evaluation) for name in run.data.params}
    assert set(view["selectedColumns"]) <= logged, set(view["selectedColumns"]) - logged
    mlflow.set_tracking_uri(tracking_uri)
    url = runs_page_url("http://127.0.0.1:5000", experiment.name)
    assert url == (
        f"http://127.0.0.1:5000/#/experiments/{experiment.experiment_id}/runs"
        "?workflowType=machine_learning&viewStateShareKey=alexnet8-runs"
    )
