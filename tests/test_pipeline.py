"""The real `dvc repro`, end to end, on a copy of the project pointed at a tiny archive."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from unittest.mock import ANY

import mlflow
import numpy as np
import pytest
from helpers import activated_environment, commit_all, evaluation_run, fresh_clone, run_command, write_params

from alexnet8.metric_names import EPOCH_METRICS

pytestmark = pytest.mark.slow


def _run(command: list[str], cwd: Path) -> str:
    """A command typed in the project after `source .venv/bin/activate` (the README's way), with
    the project's default MLflow store: no MLFLOW_* variables."""
    return run_command(command, cwd)


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_archive) -> Path:
    """A git repository holding the project, its params pointed at the tiny archive, after one `dvc repro`."""
    root = fresh_clone(tmp_path_factory.mktemp("project"))
    archive, md5 = tiny_archive
    write_params(
        root / "params.yaml",
        **{
            "fetch.url": archive.as_uri(),
            "fetch.md5": md5,
            "train.epochs": 2,
            "train.batch_size": 16,
            "train.dense_units": 64,
        },
    )
    commit_all(root, "project on the tiny archive")
    _run(["dvc", "repro"], root)
    commit_all(root, "its outputs")  # dvc.lock and the run file: each test that changes them restores them
    return root


def test_repro_writes_every_output(project):
    for relative in [
        "data/raw/cifar-10-binary.tar.gz",
        "data/prepared/train_images.npy",
        "data/prepared/dataset.json",
        "models/model.keras",
        "models/mlflow_run.json",
        "reports/train_history.csv",
        "reports/train_metrics.json",
        "reports/test_metrics.json",
        "reports/test_predictions.csv",
        "reports/figures/training_curves.png",
        "reports/figures/confusion_matrix.png",
    ]:
        assert (project / relative).exists(), relative
    assert (project / "mlflow.db").exists()


def test_dvc_metrics_show_reports_test_and_training_metrics(project):
    shown = json.loads(_run(["dvc", "metrics", "show", "--json"], project))
    files = next(iter(shown.values()))["data"]  # keyed by revision; the workspace is ""
    test_metrics = files["reports/test_metrics.json"]["data"]
    assert 0 <= test_metrics["test"]["accuracy"] <= 1 and test_metrics["test"]["loss"] > 0
    assert files["reports/train_metrics.json"]["data"] == {"train": {"loss": ANY}, "val": {"accuracy": ANY}}


def test_dvc_plots_show_renders(project):
    _run(["dvc", "plots", "show", "-o", "plots_html"], project)
    page = (project / "plots_html" / "index.html").read_text()
    assert "val/accuracy" in page and "val/loss" in page


def test_mlflow_run_holds_the_whole_pipeline(project):
    run_id = json.loads((project / "models/mlflow_run.json").read_text())["run_id"]
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.epochs"] == "2" and run.data.params["fetch.md5"] == run.data.tags["data.archive_md5"]
    # The commit the pipeline ran on: the one before the fixture's commit of its outputs.
    assert run.data.tags["mlflow.source.git.commit"] == _run(["git", "rev-parse", "HEAD^"], project).strip()
    for metric in EPOCH_METRICS:
        assert [point.step for point in client.get_metric_history(run_id, metric)] == [1, 2], metric
    assert {"training_curves.png", "confusion_matrix.png"} <= {
        artifact.path for artifact in client.list_artifacts(run_id)
    }
    evaluation = evaluation_run(client, run_id)
    assert {"test/accuracy", "test/loss"} <= set(evaluation.data.metrics)
    assert evaluation.data.tags["mlflow.source.git.commit"] == run.data.tags["mlflow.source.git.commit"]
    [logged] = mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{evaluation.info.run_id}'",
        output_format="list",
    )
    model = mlflow.pyfunc.load_model(logged.model_uri)
    assert model.predict(np.zeros((2, 32, 32, 3), dtype=np.uint8)).shape == (2, 11)  # the class, 10 probabilities


def test_second_repro_runs_nothing(project):
    output = _run(["dvc", "repro"], project)
    assert "Running stage" not in output
    assert "Data and pipelines are up to date" in output


def _weights_digest(model_path: Path) -> str:
    import keras

    from alexnet8.network import weights_digest

    return weights_digest(keras.models.load_model(model_path))


def test_forced_reruns_are_bit_identical(project):
    before = _weights_digest(project / "models/model.keras")
    metrics = {
        name: (project / name).read_bytes()
        for name in ("reports/test_metrics.json", "reports/train_metrics.json", "reports/train_history.csv")
    }
    _run(["dvc", "repro", "--force"], project)
    assert _weights_digest(project / "models/model.keras") == before
    for name, content in metrics.items():
        assert (project / name).read_bytes() == content, name


def test_mlproject_runs_the_pipeline_in_the_launchers_run(project):
    output = _run(
        [
            "mlflow",
            "run",
            ".",
            "--env-manager",
            "local",
            "--experiment-name",
            "alexnet8-cifar10",
            "-P",
            "epochs=1",
            "-P",
            "batch_size=16",
        ],
        project,
    )
    run_id = json.loads((project / "models/mlflow_run.json").read_text())["run_id"]
    assert f"Run (ID '{run_id}') succeeded" in output
    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.data.params["train.epochs"] == "1" and "test/accuracy" in evaluation_run(client, run_id).data.metrics
    _run(["git", "checkout", "--", "."], project)
    _run(["dvc", "checkout"], project)


def test_mlproject_predict_runs_the_champion_on_image_files(project):
    from PIL import Image

    from alexnet8.dataset import load_split

    images = load_split(project / "data/prepared", "test").images[:2]
    for index, pixels in enumerate(images):
        Image.fromarray(np.asarray(pixels)).save(project / f"image{index}.png")
    uri = "models:/alexnet8-cifar10@champion"
    command = ["mlflow", "run", ".", "-e", "predict", "--env-manager", "local", "--experiment-name", "predictions"]
    _run([*command, "-P", "images=image*.png", "-P", f"model_uri={uri}", "-P", "out=predictions.csv"], project)
    rows = (project / "predictions.csv").read_text().splitlines()
    assert rows[0].startswith("file,class,probability,airplane") and [row.split(",")[0] for row in rows[1:]] == [
        "image0.png",
        "image1.png",
    ]
    for name in ("image0.png", "image1.png", "predictions.csv"):
        (project / name).unlink()


def test_experiments_are_compared_in_dvc_and_tracked_in_mlflow(project):
    _run(["dvc", "exp", "run", "-n", "lr-low", "-S", "train.learning_rate=0.0005"], project)
    _run(["git", "checkout", "--", "params.yaml"], project)  # `exp run` leaves its params in the workspace
    _run(["dvc", "exp", "run", "-n", "one-epoch", "-S", "train.epochs=1"], project)
    shown = _run(["dvc", "exp", "show", "--no-pager", "--csv"], project)
    assert "lr-low" in shown and "one-epoch" in shown
    params_diff = json.loads(_run(["dvc", "params", "diff", "lr-low", "one-epoch", "--json"], project))["params.yaml"]
    assert params_diff["train.learning_rate"] == {"old": 0.0005, "new": 0.001, "diff": 0.0005}
    assert params_diff["train.epochs"] == {"old": 2, "new": 1, "diff": -1}
    metrics_diff = json.loads(_run(["dvc", "metrics", "diff", "lr-low", "one-epoch", "--json"], project))
    assert "reports/test_metrics.json" in metrics_diff
    _run(["dvc", "plots", "diff", "lr-low", "one-epoch", "-o", "diff_html"], project)
    assert (project / "diff_html" / "index.html").exists()

    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    runs = {
        run.data.tags.get("dvc.experiment"): run
        for run in client.search_runs(experiment_ids=[client.get_experiment_by_name("alexnet8-cifar10").experiment_id])
        if "mlflow.parentRunId" not in run.data.tags
    }
    assert {"lr-low", "one-epoch"} <= set(runs)
    head = _run(["git", "rev-parse", "HEAD"], project).strip()
    for name in ("lr-low", "one-epoch"):
        tags = runs[name].data.tags
        assert runs[name].info.run_name == name and tags["git.commit"] == head and tags["git.dirty"] == "true"
        assert tags["data.archive_md5"] and len(tags["data.prepared_md5"]) == 32 and "alexnet8 train" in tags["command"]
        artifacts = {artifact.path for artifact in client.list_artifacts(runs[name].info.run_id, "provenance")}
        assert artifacts >= {
            "provenance/params.yaml",
            "provenance/dvc.lock",
            "provenance/packages.txt",
            "provenance/dataset.json",
            "provenance/uncommitted.diff",  # the tree is dirty: params.yaml holds the experiment's values
        }
        diff = Path(client.download_artifacts(runs[name].info.run_id, "provenance/uncommitted.diff")).read_text()
        assert "diff --git a/params.yaml b/params.yaml" in diff
    assert runs["lr-low"].data.params["train.learning_rate"] == "0.0005"
    _run(["git", "checkout", "--", "."], project)
    _run(["dvc", "checkout"], project)


def test_queued_experiments_run_by_dvc_queue_start_each_become_an_mlflow_run(project):
    rates = {"queued-fast": 0.002, "queued-slow": 0.0002}
    for name, rate in rates.items():
        _run(["dvc", "exp", "run", "--queue", "-n", name, "-S", f"train.learning_rate={rate}"], project)
    _run(["dvc", "queue", "start", "--jobs", "1"], project)  # returns at once: a worker runs the queue
    deadline = time.monotonic() + 900
    while re.search(r"\b(Queued|Running)\b", status := _run(["dvc", "queue", "status"], project)):
        assert time.monotonic() < deadline, f"the queue did not finish in 15 minutes:\n{status}"
        time.sleep(5)
    assert all(re.search(rf"{name}\s.*Success", status) for name in rates), status
    shown = _run(["dvc", "exp", "show", "--no-pager", "--csv"], project)
    assert all(name in shown for name in rates)

    # Queued experiments run in temporary copies under .dvc/tmp/exps, yet log to the project's store.
    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    runs = {
        run.data.tags.get("dvc.experiment"): run
        for run in client.search_runs(experiment_ids=[client.get_experiment_by_name("alexnet8-cifar10").experiment_id])
        if "mlflow.parentRunId" not in run.data.tags  # training runs, not the evaluations nested in them
    }
    for name, rate in rates.items():
        run = runs[name]
        assert run.info.status == "FINISHED" and run.data.params["train.learning_rate"] == str(rate)
        assert "train/accuracy" in run.data.metrics
        assert "test/accuracy" in evaluation_run(client, run.info.run_id).data.metrics
    assert runs["queued-fast"].info.run_id != runs["queued-slow"].info.run_id


def test_an_edited_param_shows_in_params_diff_and_reruns_only_what_depends_on_it(project):
    write_params(project / "params.yaml", base=project / "params.yaml", **{"train.epochs": 3})
    diff = _run(["dvc", "params", "diff", "--json"], project)
    assert json.loads(diff)["params.yaml"] == {"train.epochs": {"old": 2, "new": 3, "diff": 1}}
    status = json.loads(_run(["dvc", "status", "--json"], project))
    assert "train" in status and "fetch" not in status and "preprocess" not in status
    _run(["git", "checkout", "--", "params.yaml"], project)


def test_dvc_exp_show_after_one_changed_param_fits_160_columns_and_the_readmes_command_80(project):
    """The changed param in full (DVC ends the header with `…` for the columns that do not fit:
    here the md5s of changed dependencies and outputs). The workspace is committed first, as the
    README's step 3 does, so the table holds that baseline and this one experiment."""
    commit_all(project, "baseline for the width of dvc exp show", allow_empty=True)
    _run(["dvc", "exp", "run", "-n", "width", "-S", "train.learning_rate=0.0007"], project)
    for columns, drop in ((160, []), (80, ["--drop", "Created|.*loss|val.*|.*/.*"])):
        environment = activated_environment(COLUMNS=str(columns))
        shown = run_command(["dvc", "exp", "show", "--only-changed", "--no-pager", *drop], project, environment)
        lines = [line for line in shown.splitlines() if line.strip()]
        header = next(line for line in lines if "Experiment" in line)
        assert all(len(line) <= columns for line in lines), shown
        assert re.search(r"\btrain\.learning_rate\b", header), shown
    _run(["git", "checkout", "--", "."], project)
    _run(["dvc", "checkout"], project)
