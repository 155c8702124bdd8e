"""Multi-worker training (TF_CONFIG, MultiWorkerMirroredStrategy): the workers' shares of each
batch, the launcher, and (slow) 2 workers on this machine: a finished run, reproducible, close
to 1 worker, resumed after a worker was killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import mlflow
import numpy as np
import pytest
import tensorflow as tf
from helpers import PROJECT_ROOT, load_script, write_params

from alexnet8 import launch_workers
from alexnet8.checkpoints import save_epoch
from alexnet8.dataset import load_split
from alexnet8.errors import PipelineError
from alexnet8.input_pipeline import augment, make_dataset
from alexnet8.multi_worker import (
    WORKERS_TAG,
    Cluster,
    check_last_batch,
    cluster_from_environment,
    peer_failures_explained,
    per_worker_batch_size,
)
from alexnet8.reports import history_rows

SRC = str(PROJECT_ROOT / "src")


def _tf_config(cluster, task_type="worker", index=0) -> dict[str, str]:
    return {"TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": task_type, "index": index}})}


def test_without_tf_config_there_is_no_cluster():
    assert cluster_from_environment({}) is None
    assert cluster_from_environment({"TF_CONFIG": " "}) is None


def test_tf_config_gives_the_workers_rank_with_the_chief_first():
    two = {"worker": ["a:1", "b:1"]}
    assert cluster_from_environment(_tf_config(two, index=1)) == Cluster(workers=2, rank=1, task="worker:1")
    assert cluster_from_environment(_tf_config(two, index=0)).is_chief
    with_chief = {"chief": ["c:1"], "worker": ["a:1", "b:1"]}
    assert cluster_from_environment(_tf_config(with_chief, "chief")) == Cluster(3, 0, "chief:0")
    assert cluster_from_environment(_tf_config(with_chief, "worker", 1)) == Cluster(3, 2, "worker:1")


@pytest.mark.parametrize(
    ("environment", "message"),
    [
        ({"TF_CONFIG": "{cluster"}, "TF_CONFIG is not valid JSON"),
        ({"TF_CONFIG": '{"task": {}}'}, 'has no "cluster" mapping'),
        (_tf_config({"worker": ["a:1"], "ps": ["p:1"]}), "names the job(s) ps"),
        (_tf_config({"worker": "a:1"}), 'not a list of "host:port" addresses'),
        (_tf_config({"worker": ["a:1", "b:1"]}, index=2), "must be 0 to 1"),
        (_tf_config({"worker": ["a:1"]}, task_type="chief"), '"type" must be one of worker'),
    ],
    ids=["not JSON", "no cluster", "parameter server", "not a list", "index", "type"],
)
def test_a_bad_tf_config_says_what_is_wrong_and_how_it_should_look(environment, message):
    with pytest.raises(PipelineError, match="unset it to train on this machine alone") as raised:
        cluster_from_environment(environment)
    assert message in str(raised.value)


def test_the_global_batch_must_split_evenly_over_the_workers():
    assert per_worker_batch_size(32, 4) == 8
    with pytest.raises(
        PipelineError, match=r"train.batch_size = 30 is the global batch.*multiple of 4 \(e.g. 28 or 32\)"
    ):
        per_worker_batch_size(30, 4)
    check_last_batch(90, 32, 2)  # a last batch of 26
    with pytest.raises(PipelineError, match="a last batch of 1 per epoch"):
        check_last_batch(97, 32, 2)


def test_a_peer_failure_says_what_happened_and_from_which_epoch_to_resume(tmp_path):
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    model.optimizer.build(model.trainable_variables)
    (tmp_path / "history.csv").write_text("epoch,train/loss\n1,1.0\n2,0.5\n")
    save_epoch(tmp_path, 2, model, tmp_path / "history.csv")  # the chief's set of epoch 2
    message = (
        "{{function_node __wrapped__CollectiveReduceV2_device_/job:worker/replica:0/task:1/device:CPU:0}} "
        "Collective ops is aborted by: recvmsg:Connection reset by peer\nAdditional GRPC error information"
    )
    with pytest.raises(PipelineError) as raised, peer_failures_explained(tmp_path):
        raise tf.errors.UnavailableError(None, None, message)
    assert str(raised.value) == (
        "a worker of the multi-worker training stopped or cannot be reached (UnavailableError: Collective ops "
        "is aborted by: recvmsg:Connection reset by peer): run all the workers again to resume after epoch 2"
    )


def _batches(dataset, count):
    return [(images.numpy(), labels.numpy()) for images, labels in dataset.take(count)]


@pytest.mark.parametrize("workers_count", [2, 3])
def test_the_workers_shares_of_each_step_are_exactly_the_one_worker_batch(prepared_dir, workers_count):
    split = load_split(prepared_dir, "train")  # 90 images: 3 steps of 30, across epochs
    options = {"shuffle_seed": 5, "random_flip": True, "random_crop_padding": 4, "cutout_size": 8}
    whole = _batches(make_dataset(split, 30, **options), 7)
    shares = [
        _batches(make_dataset(split, 30, **options, workers=workers_count, rank=rank), 7)
        for rank in range(workers_count)
    ]
    for step, (images, labels) in enumerate(whole):
        for rank in range(workers_count):
            share_images, share_labels = shares[rank][step]
            assert len(share_labels) == 30 // workers_count
            np.testing.assert_array_equal(share_images, images[rank::workers_count])
            np.testing.assert_array_equal(share_labels, labels[rank::workers_count])
    validation = load_split(prepared_dir, "validation")
    [(images, labels)] = _batches(make_dataset(validation, 32), 2)
    [(share, share_labels)] = _batches(make_dataset(validation, 32, workers=2, rank=1), 2)
    np.testing.assert_array_equal(share, images[1::2])
    np.testing.assert_array_equal(share_labels, labels[1::2])


def test_one_workers_flip_is_tensorflows_stateless_random_flip():
    images = tf.constant(np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8))
    seed = tf.constant([3, 4], tf.int64)
    expected = tf.image.stateless_random_flip_left_right(images, seed=seed)
    np.testing.assert_array_equal(augment(images, seed, flip=True, crop_padding=0), expected)


def test_the_launcher_gives_each_worker_its_place_on_free_local_ports():
    ports = launch_workers.free_ports(3)
    assert len(set(ports)) == 3
    configs = launch_workers.tf_configs(ports)
    clusters = [cluster_from_environment({"TF_CONFIG": config}) for config in configs]
    assert [cluster.rank for cluster in clusters] == [0, 1, 2] and {cluster.workers for cluster in clusters} == {3}
    assert json.loads(configs[2])["cluster"]["worker"] == [f"127.0.0.1:{port}" for port in ports]


def test_the_launchers_default_command_is_the_train_stage_of_dvc_yaml():
    command = launch_workers.train_stage_command(PROJECT_ROOT / "dvc.yaml")
    assert command[:4] == ["python", "-m", "alexnet8", "train"]
    assert "--checkpoints" in command and not any("${" in part for part in command)


def test_the_scaling_model_breaks_even_where_compute_saved_equals_the_all_reduce():
    model = load_script("bench/scaling_model.py")
    assert round(model.GRADIENT_BYTES / 1e6, 1) == 38.6
    bandwidth = 10e9 / 8
    even = model.break_even_batch(rate=215, bandwidth=bandwidth)
    assert even == pytest.approx(2 * 38.556712e6 * 215 / bandwidth)
    for workers_count in (2, 4, 8):  # latency aside, N workers break even at the same batch
        no_latency = model.step_seconds(workers_count, even, 215, bandwidth, latency=0)
        assert no_latency == pytest.approx(model.step_seconds(1, even, 215, bandwidth))
    assert model.speedup(8, 2048, 215, 100e9 / 8) == pytest.approx(7.96, abs=0.01)
    assert "| 1 Gbit/s | 133 | 0.39x / 0.30x / 0.27x |" in model.table(215)


# End to end: real worker processes on 127.0.0.1, on the tiny archive.

EPOCHS = 3
TINY = {"train.epochs": EPOCHS, "train.batch_size": 32, "train.dense_units": 64, "train.random_flip": True}
# A dead worker makes the others fail within about this long (heartbeat timeout + propagation).
DEAD_PEER_SECONDS = 90


def _environment(tmp_path: Path) -> dict[str, str]:
    return os.environ | {"PYTHONPATH": SRC, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}


def _train_command(folder: Path, prepared_dir: Path, params_file: Path) -> list[str]:
    outputs = {"model": "model.keras", "history": "history.csv", "metrics": "train.json", "run-file": "run.json"}
    return [
        sys.executable,
        "-m",
        "alexnet8",
        "train",
        "--params",
        str(params_file),
        "--data",
        str(prepared_dir),
        *(part for option, name in outputs.items() for part in (f"--{option}", str(folder / name))),
        "--checkpoints",
        str(folder / "checkpoints"),
    ]


def _launch(workers_count: int, command: list[str], environment, timeout=240) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "alexnet8.launch_workers", "--workers", str(workers_count), "--", *command]
    return subprocess.run(launcher, env=environment, capture_output=True, text=True, timeout=timeout)


def _weights(model_file: Path) -> list[np.ndarray]:
    from alexnet8.evaluate import load_trained_model

    return load_trained_model(model_file).get_weights()


@pytest.fixture(scope="module")
def two_worker_runs(tiny_archive, tmp_path_factory):
    """The train stage on 2 workers, twice, and on 1 worker, with one MLflow store, on the tiny
    archive prepared with standardization (an extra layer, whose statistics every worker needs)."""
    from alexnet8.params import load_params
    from alexnet8.preprocess import preprocess

    root = tmp_path_factory.mktemp("multi_worker")
    params_file = write_params(root / "params.yaml", **TINY, **{"preprocess.normalization": "standardize"})
    params = load_params(params_file)
    prepared_dir = root / "prepared"
    preprocess(tiny_archive[0], prepared_dir, params.preprocess, params.seed)
    environment = _environment(root)
    folders = {name: root / name for name in ("two", "two_again", "one")}
    started = time.monotonic()
    for name in ("two", "two_again"):
        result = _launch(2, _train_command(folders[name], prepared_dir, params_file), environment)
        assert result.returncode == 0, result.stderr
        folders[name + "_log"] = result.stderr
    folders["seconds"] = (time.monotonic() - started) / 2
    result = subprocess.run(
        _train_command(folders["one"], prepared_dir, params_file), env=environment, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    folders["prepared"] = prepared_dir
    return root, params_file, folders


@pytest.mark.slow
def test_two_workers_finish_log_one_mlflow_run_from_the_chief_and_write_only_its_outputs(two_worker_runs):
    root, _, folders = two_worker_runs
    log = folders["two_log"]
    assert "[worker 0]" in log and "[worker 1]" in log
    assert "[worker 1] " in log and "worker:1 done: the chief saves the model and logs the run" in log
    # The outputs are the chief's; the checkpoint is gone once the model is saved and every epoch logged.
    assert sorted(path.name for path in folders["two"].iterdir()) == [
        "checkpoints",
        "history.csv",
        "model.keras",
        "run.json",
        "train.json",
    ]
    assert not any((folders["two"] / "checkpoints").iterdir())
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    experiments = [experiment.experiment_id for experiment in client.search_experiments()]
    runs = client.search_runs(experiments)
    assert sorted(run.data.tags[WORKERS_TAG] for run in runs) == ["1", "2", "2"]
    two = client.get_run(json.loads((folders["two"] / "run.json").read_text())["run_id"])
    assert two.info.status == "FINISHED" and two.data.tags[WORKERS_TAG] == "2"
    assert [point.step for point in client.get_metric_history(two.info.run_id, "train/loss")] == list(
        range(1, EPOCHS + 1)
    )
    assert "model_summary.txt" in {artifact.path for artifact in client.list_artifacts(two.info.run_id)}


@pytest.mark.slow
def test_two_workers_rerun_to_identical_weights_and_train_like_one_worker(two_worker_runs):
    _, _, folders = two_worker_runs
    first, again = _weights(folders["two"] / "model.keras"), _weights(folders["two_again"] / "model.keras")
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    two = history_rows(folders["two"] / "history.csv")[-1]
    one = history_rows(folders["one"] / "history.csv")[-1]
    # Same global batch, data and augmentation; only the dropout masks and the batch-norm
    # statistics (over 16 images instead of 32) differ: the two learn alike.
    assert abs(two["train/accuracy"] - one["train/accuracy"]) <= 0.25, (one, two)
    assert abs(two["train/loss"] - one["train/loss"]) <= 0.5 * max(one["train/loss"], two["train/loss"]), (one, two)


def _wait_for(process: subprocess.Popen, lines: list[str], text: str, deadline: float) -> None:
    for line in process.stdout:
        lines.append(line)
        if text in line:
            return
        assert time.monotonic() < deadline, "".join(lines)
    raise AssertionError("".join(lines))


@pytest.mark.slow
def test_a_killed_worker_stops_the_others_with_a_message_and_the_rerun_resumes(two_worker_runs, tmp_path):
    _, params_file, folders = two_worker_runs
    prepared_dir = folders["prepared"]
    params_file = write_params(tmp_path / "params.yaml", base=params_file)
    environment = _environment(tmp_path)
    command = _train_command(tmp_path, prepared_dir, params_file)
    configs = launch_workers.tf_configs(launch_workers.free_ports(2))
    processes = [
        subprocess.Popen(
            command,
            env=environment | {"TF_CONFIG": config},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for config in configs
    ]
    chief_lines: list[str] = []
    try:
        _wait_for(processes[0], chief_lines, f"epoch 1/{EPOCHS} done", time.monotonic() + 180)
        processes[1].send_signal(signal.SIGKILL)  # mid-epoch 2
        killed = time.monotonic()
        chief_lines.append(processes[0].communicate(timeout=DEAD_PEER_SECONDS)[0])
        stopped_within = time.monotonic() - killed
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    output = "".join(chief_lines)
    assert processes[0].returncode == 1, output
    assert "a worker of the multi-worker training stopped or cannot be reached" in output
    assert "run all the workers again to resume after epoch 1" in output
    assert stopped_within < DEAD_PEER_SECONDS

    rerun = _launch(2, command, environment)
    assert rerun.returncode == 0, rerun.stderr
    assert "[worker 0] " in rerun.stderr and f"after epoch 1 of {EPOCHS}" in rerun.stderr
    uninterrupted, resumed = _weights(folders["two"] / "model.keras"), _weights(tmp_path / "model.keras")
    assert all(np.array_equal(a, b) for a, b in zip(uninterrupted, resumed, strict=True))
