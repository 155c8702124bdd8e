"""The train stage as a Ray Train job (alexnet8.ray_training): the worker's command line, what is
shipped and forwarded, and (marker `ray`) a real job on the tiny archive, first on a local cluster
the command starts and stops, then on a 2-node cluster with a worker killed mid-epoch."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import mlflow
import psutil
import pytest
from helpers import (
    MAKE,
    PROJECT_ROOT,
    commit_all,
    free_port,
    fresh_clone,
    link_test_environment,
    make,
    minimal_environment,
    run_command,
    write_params,
)

from alexnet8 import ray_training
from alexnet8.__main__ import command_parser
from alexnet8.errors import PipelineError
from alexnet8.launch_workers import train_stage_command
from alexnet8.multi_worker import WORKERS_TAG
from alexnet8.tracking import WEIGHTS_DIGEST_TAG


def test_each_worker_runs_dvc_yamls_train_command_with_the_checkpoints_in_the_storage_path():
    options = ray_training.stage_options(train_stage_command(PROJECT_ROOT / "dvc.yaml"))
    argv = ray_training.worker_argv(options, "/mnt/nfs/ray/alexnet8-train-0123/checkpoints")
    parsed = command_parser().parse_args(argv)  # what `python -m alexnet8` makes of them
    assert parsed.stage == "train" and parsed.checkpoints == "/mnt/nfs/ray/alexnet8-train-0123/checkpoints"
    assert (parsed.data, parsed.model, parsed.run_file) == (
        "data/prepared",
        "models/model.keras",
        "models/mlflow_run.json",
    )
    assert set(ray_training.OUTPUT_OPTIONS) <= set(options)


def test_only_mlflow_aws_and_the_projects_variables_reach_the_workers():
    environment = {"MLFLOW_TRACKING_PASSWORD": "p", "AWS_SECRET_ACCESS_KEY": "k", "ALEXNET8_LOG_LEVEL": "DEBUG"}
    assert ray_training.forwarded_environment(environment | {"HOME": "/root", "TF_CONFIG": "{}"}) == environment


def test_the_workers_get_params_dvc_lock_and_the_two_training_splits_byte_for_byte(prepared_dir, tmp_path):
    root = tmp_path / "project"
    shutil.copytree(prepared_dir, root / "data" / "prepared")
    shutil.copy(PROJECT_ROOT / "params.yaml", root)
    files = ray_training.workspace_files(root, "data/prepared")
    assert files[0] == "params.yaml" and "dvc.lock" not in files and len(files) == 6
    assert not any("test_" in name for name in files)
    ray_training.write_workspace(ray_training.read_workspace(root, files), tmp_path / "worker")
    for name in files:
        assert (tmp_path / "worker" / name).read_bytes() == (root / name).read_bytes()
    with pytest.raises(PipelineError, match=r"data/elsewhere/dataset.json.* not found: run `dvc repro preprocess`"):
        ray_training.workspace_files(root, "data/elsewhere")


def test_the_ray_run_is_named_by_the_checkpoints_training_key_and_a_batch_that_does_not_split_fails_first(
    prepared_dir, tmp_path
):
    from alexnet8.checkpoints import training_key
    from alexnet8.dataset import load_description
    from alexnet8.params import load_params

    write_params(tmp_path / "params.yaml", **{"train.batch_size": 30})  # 90 training images: 3 full batches
    key = training_key(load_params(tmp_path / "params.yaml"), load_description(prepared_dir))
    assert ray_training.run_key(tmp_path, str(prepared_dir), workers=3) == key
    with pytest.raises(PipelineError, match="train.batch_size = 30 is the global batch"):
        ray_training.run_key(tmp_path, str(prepared_dir), workers=4)


def test_a_tracking_server_that_does_not_answer_fails_the_job_before_ray_starts(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(PipelineError, match="does not answer"):
        ray_training.prepare_tracking(tmp_path)


# A real Ray Train job, on the tiny archive: 3 epochs of 3 steps, 2 workers.

EPOCHS = 3
SECRETS = {
    "MLFLOW_TRACKING_PASSWORD": "s3cr3t-pa55word-0f-the-test",
    "AWS_SECRET_ACCESS_KEY": "s3cr3t-s3-key-0f-the-test",
}


def _ray_processes(temp_dir: Path) -> list[str]:
    """The command lines of the processes of the Ray cluster whose temporary folder is `temp_dir`."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        command = " ".join(process.info["cmdline"] or [])
        if str(temp_dir) in command:
            found.append(command)
    return found


TRAIN_RAY = [*MAKE, "train-ray", "WORKERS=2"]


def _driver(project: Path, **environment: str) -> subprocess.Popen:
    """`make train-ray WORKERS=2` typed in the project from a plain shell (docs/scaling.md), in a
    process group of its own so that a job that overruns is stopped whole."""
    return subprocess.Popen(
        TRAIN_RAY,
        cwd=project,
        env=minimal_environment(**SECRETS, **environment),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _stop(driver: subprocess.Popen) -> None:
    if driver.poll() is None:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()


def _kill_rank_1_after_epoch_1(driver: subprocess.Popen, lines: list[str], project: Path) -> None:
    """Read the job's output until epoch 1 is done, wait for the chief's checkpoint of it (in the
    storage path), then SIGKILL rank 1's process."""
    rank_1 = None
    for line in driver.stdout:
        lines.append(line)
        if found := re.search(r"rank 1 of 2 \(pid (\d+)", line):
            rank_1 = int(found[1])
        if rank_1 and f"epoch 1/{EPOCHS} done" in line:
            deadline = time.monotonic() + 60
            while not list(project.glob("checkpoints/ray/*/checkpoints/*/epoch-1")):
                assert time.monotonic() < deadline, "".join(lines)
                time.sleep(0.05)
            os.kill(rank_1, signal.SIGKILL)  # in epoch 2
            return
    raise AssertionError("".join(lines))


def _state_api_output(dashboard: str) -> str:
    """What Ray's state API and dashboard show of the cluster: actors, jobs, runtime
    environments, and the Train runs with their configuration."""
    shown = [
        run_command(["ray", "list", kind, "--detail", "--address", dashboard], PROJECT_ROOT)
        for kind in ("actors", "jobs", "runtime-envs", "placement-groups")
    ]
    for path in ("/api/train/v2/runs/v1", "/api/jobs/"):
        with urllib.request.urlopen(dashboard + path, timeout=30) as answer:
            shown.append(answer.read().decode())
    return "\n".join(shown)


def _folder_text(folder: Path) -> str:
    return "\n".join(path.read_bytes().decode(errors="replace") for path in folder.rglob("*") if path.is_file())


@pytest.fixture(scope="module")
def ray_jobs(tiny_archive, tmp_path_factory):
    """A project on the tiny archive after `dvc repro preprocess`; `make train-ray`'s command run
    once on a local cluster of its own, then on a 2-node cluster (head and one node, 1 CPU each,
    started with Ray's own test utility) where rank 1 is killed after epoch 1."""
    from ray.cluster_utils import Cluster

    project = fresh_clone(tmp_path_factory.mktemp("ray") / "project")
    archive, md5 = tiny_archive
    tiny = {"train.epochs": EPOCHS, "train.batch_size": 32, "train.dense_units": 64, "train.random_flip": True}
    write_params(project / "params.yaml", **{"fetch.url": archive.as_uri(), "fetch.md5": md5}, **tiny)
    commit_all(project, "project on the tiny archive")
    link_test_environment(project)
    run_command(["dvc", "repro", "preprocess"], project)
    seen: dict[str, object] = {"project": project}
    # Ray's sockets live in its temporary folder, whose path must stay short.
    local_temp, cluster_temp = (Path(tempfile.mkdtemp(prefix="ray", dir="/tmp")) for _ in range(2))
    try:
        local = _driver(project, RAY_TMPDIR=str(local_temp))
        try:
            seen["local_log"] = local.communicate(timeout=600)[0]
        finally:
            _stop(local)
        (project.parent / "local.log").write_text(seen["local_log"])
        assert local.returncode == 0, seen["local_log"]
        seen["local_left"] = _ray_processes(local_temp)
        seen["local_run"] = json.loads((project / "models/mlflow_run.json").read_text())["run_id"]

        hidden = {name: os.environ.pop(name) for name in ray_training.forwarded_environment()}
        # Ray's test utility writes the cluster's address into $RAY_TMPDIR/ray (by default /tmp/ray,
        # which it does not create): here, inside the test's own folder.
        ray_tmpdir = os.environ.get("RAY_TMPDIR")
        os.environ["RAY_TMPDIR"] = str(cluster_temp)
        (cluster_temp / "ray").mkdir()
        try:  # the cluster's processes get no MLflow variables: the workers get them from the driver
            cluster = Cluster(
                initialize_head=True,
                head_node_args={"num_cpus": 1, "temp_dir": str(cluster_temp), "dashboard_port": free_port()},
            )
            cluster.add_node(num_cpus=1)
        finally:
            os.environ.update(hidden)
            if ray_tmpdir is None:
                os.environ.pop("RAY_TMPDIR")
            else:
                os.environ["RAY_TMPDIR"] = ray_tmpdir
        try:
            # With the Train runs' state (their configuration included) on the dashboard.
            driver = _driver(project, RAY_ADDRESS=cluster.address, RAY_TRAIN_ENABLE_STATE_TRACKING="1")
            lines: list[str] = []
            try:
                _kill_rank_1_after_epoch_1(driver, lines, project)
                lines.append(driver.communicate(timeout=600)[0])
            finally:
                _stop(driver)
            seen["cluster_log"] = "".join(lines)
            (project.parent / "cluster.log").write_text(seen["cluster_log"])
            assert driver.returncode == 0, seen["cluster_log"]
            seen["state"] = _state_api_output(f"http://{cluster.webui_url}")
        finally:
            cluster.shutdown()
        seen["cluster_files"] = _folder_text(cluster_temp) + _folder_text(local_temp)
        time.sleep(1)  # the last of the killed processes to be reaped
        seen["cluster_left"] = _ray_processes(cluster_temp)
        seen["cluster_run"] = json.loads((project / "models/mlflow_run.json").read_text())["run_id"]
    finally:
        shutil.rmtree(local_temp, ignore_errors=True)
        shutil.rmtree(cluster_temp, ignore_errors=True)
    return seen


def _client(project: Path) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")


@pytest.mark.ray
def test_a_ray_job_logs_one_finished_run_from_rank_0_and_leaves_no_ray_process(ray_jobs):
    client = _client(ray_jobs["project"])
    run = client.get_run(ray_jobs["local_run"])
    assert run.info.status == "FINISHED" and run.data.tags[WORKERS_TAG] == "2"
    assert run.data.tags["command"].endswith("-m alexnet8.ray_training --workers 2")
    assert "git.commit" in run.data.tags  # the provenance of the project, not of the worker's folder
    assert [point.step for point in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2, 3]
    experiment = run.info.experiment_id
    assert len(client.search_runs([experiment])) == 2  # one per job, the restarted one included
    assert ray_jobs["local_left"] == [] and ray_jobs["cluster_left"] == []
    assert "Started a local Ray instance" in ray_jobs["local_log"]


@pytest.mark.ray
def test_a_worker_killed_mid_epoch_is_restarted_by_ray_and_resumes_in_the_same_run_to_the_same_weights(ray_jobs):
    log = ray_jobs["cluster_log"]
    assert f"after epoch 1 of {EPOCHS}" in log or f"after epoch 2 of {EPOCHS}" in log, log
    assert len(re.findall(r"rank 0 of 2 \(pid", log)) == 2  # the first attempt and the restart
    client = _client(ray_jobs["project"])
    resumed, first = client.get_run(ray_jobs["cluster_run"]), client.get_run(ray_jobs["local_run"])
    assert resumed.info.status == "FINISHED" and resumed.data.tags[WORKERS_TAG] == "2"
    for metric in ("train/loss", "val/accuracy"):  # nothing logged twice
        assert [point.step for point in client.get_metric_history(resumed.info.run_id, metric)] == [1, 2, 3]
    assert resumed.data.tags[WEIGHTS_DIGEST_TAG] == first.data.tags[WEIGHTS_DIGEST_TAG]


@pytest.mark.ray
def test_after_a_ray_job_dvc_status_is_clean_once_evaluate_scored_the_model(ray_jobs):
    project = ray_jobs["project"]
    repro = run_command(["dvc", "repro"], project)
    assert "Running stage 'train'" not in repro and "Running stage 'evaluate'" in repro
    assert 0 <= json.loads((project / "reports/test_metrics.json").read_text())["test"]["accuracy"] <= 1
    assert "Data and pipelines are up to date" in run_command(["dvc", "status"], project)
    assert not any((project / "checkpoints" / "ray").iterdir())  # the job's state, gone once done


@pytest.mark.ray
def test_secrets_reach_the_workers_but_not_rays_state_api_dashboard_or_logs(ray_jobs):
    received = re.findall(r"rank \d of 2 .* from the driver", ray_jobs["cluster_log"])
    assert len(received) == 4 and all(set(SECRETS) <= set(re.findall(r"\w+", line)) for line in received)
    assert "RayTrainWorker" in ray_jobs["state"] and ray_training.RUN_PREFIX in ray_jobs["state"]  # what was looked at
    for name, secret in SECRETS.items():
        for where in ("local_log", "cluster_log", "state", "cluster_files"):
            assert secret not in ray_jobs[where], f"{name} shows in {where}"


@pytest.mark.ray
@pytest.mark.stack
def test_with_the_team_stack_up_the_run_and_its_artifacts_land_on_its_server(tiny_archive, tmp_path):
    """`source .stack/env && make train-ray`: the job's run is on the stack's MLflow server (its
    PostgreSQL), its artifacts in the stack's S3 store, as `dvc repro` would log them."""
    from test_stack import Stack, _free_ports, client_settings, tiny_project

    project = tiny_project(tmp_path / "team", *tiny_archive, **{"train.epochs": 1})
    stack, environ = Stack(project), dict(os.environ)
    ray_temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # Ray's socket paths must stay short
    try:
        make(project, "stack-up", **_free_ports())
        run_command(["dvc", "repro", "preprocess"], project, stack.environment())
        # `source .stack/env`, then make (docs/scaling.md): nothing else of the project is active.
        shell = minimal_environment(**client_settings(project), RAY_TMPDIR=str(ray_temp))
        run_command(TRAIN_RAY, project, shell)
        run_id = json.loads((project / "models/mlflow_run.json").read_text())["run_id"]
        client = stack.client()
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED" and run.data.tags[WORKERS_TAG] == "2"
        assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # served from the stack's store
        logged = {artifact.path for artifact in client.list_artifacts(run_id)}
        assert {"model_summary.txt", "provenance"} <= logged, logged
        assert _ray_processes(ray_temp) == []
    finally:
        os.environ.clear()
        os.environ.update(environ)  # stack.client() set the stack's credentials in this process
        make(project, "stack-down")
        shutil.rmtree(ray_temp, ignore_errors=True)
