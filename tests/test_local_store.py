"""The local default store (SQLite, ./mlflow.db, nothing set) under two DVC queue workers at once:
the first two stages create the store together, then write to it together, and no run is lost.

Without a lock around the store's creation (alexnet8.tracking), one of the two first trainings
failed with `table registered_model_tags already exists`: both ran MLflow's schema migrations on
the new file. Writes after that wait for each other (MLflow sets SQLite's busy timeout to 20 s);
`database is locked` never appeared.
"""

from __future__ import annotations

import re
import time

import mlflow
import pytest
from helpers import commit_all, evaluation_run, fresh_clone, run_command, write_params

from alexnet8.metric_names import EPOCH_METRICS

pytestmark = pytest.mark.slow

EXPERIMENTS = {f"local-{index}": round(0.0011 + 0.0001 * index, 4) for index in range(4)}


def test_two_queue_workers_on_a_new_local_store_lose_nothing(tmp_path, tiny_archive):
    project = fresh_clone(tmp_path / "project")
    archive, md5 = tiny_archive
    write_params(
        project / "params.yaml",
        **{
            "fetch.url": archive.as_uri(),
            "fetch.md5": md5,
            "train.epochs": 2,
            "train.batch_size": 16,
            "train.dense_units": 16,
            "train.jit_compile": False,  # XLA's compile would cost each experiment seconds; tested here is the store
        },
    )
    commit_all(project, "project on the tiny archive")
    for name, rate in EXPERIMENTS.items():
        run_command(["dvc", "exp", "run", "--queue", "-n", name, "-S", f"train.learning_rate={rate}"], project)
    assert not (project / "mlflow.db").exists()

    started = time.monotonic()
    run_command(["dvc", "queue", "start", "--jobs", "2"], project)
    deadline = time.monotonic() + 900
    while re.search(r"\b(Queued|Running)\b", status := run_command(["dvc", "queue", "status"], project)):
        assert time.monotonic() < deadline, f"the queue did not finish in 15 minutes:\n{status}"
        time.sleep(3)
    print(f"{len(EXPERIMENTS)} queued experiments, 2 workers, local store: {time.monotonic() - started:.1f} s")
    logs = {name: run_command(["dvc", "queue", "logs", name], project) for name in EXPERIMENTS}
    for name in EXPERIMENTS:
        assert re.search(rf"{name}\s.*Success", status), f"{status}\n{logs[name][-5000:]}"
        assert not re.search(r"database is locked|table \w+ already exists", logs[name]), logs[name][-5000:]

    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("alexnet8-cifar10")
    trainings = [
        run for run in client.search_runs([experiment.experiment_id]) if "mlflow.parentRunId" not in run.data.tags
    ]
    runs = {run.data.tags.get("dvc.experiment"): run for run in trainings}
    assert set(runs) == set(EXPERIMENTS)
    for name, rate in EXPERIMENTS.items():
        run = runs[name]
        assert run.info.status == "FINISHED" and run.data.params["train.learning_rate"] == str(rate)
        for metric in EPOCH_METRICS:
            assert [point.step for point in client.get_metric_history(run.info.run_id, metric)] == [1, 2], metric
        assert "test/accuracy" in evaluation_run(client, run.info.run_id).data.metrics
    versions = client.search_model_versions("name = 'alexnet8-cifar10'")
    assert sorted(int(version.version) for version in versions) == [1, 2, 3, 4]
