"""Faults: interrupted training resumes exactly, failures end MLflow runs truthfully, bad files are refused."""

from __future__ import annotations

import io
import json
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import keras
import mlflow
import numpy as np
import pytest
import yaml
from helpers import PROJECT_ROOT, commit_all, evaluation_run, run_command, write_params

from alexnet8 import train
from alexnet8.__main__ import run_stage
from alexnet8.checkpoints import completed_epochs
from alexnet8.dataset import load_split
from alexnet8.errors import DataError, PipelineError
from alexnet8.evaluate import load_trained_model
from alexnet8.metric_names import EPOCH_METRICS
from alexnet8.params import TrainParams, load_params
from alexnet8.preprocess import read_archive

# No XLA: compiling the train step costs each training process seconds, and these tests are about
# faults, not the arithmetic (test_optimization.py compiles it).
TINY = {"train.epochs": 3, "train.batch_size": 16, "train.dense_units": 32, "train.jit_compile": False}


def _params(**overrides) -> TrainParams:
    values = load_params(PROJECT_ROOT / "params.yaml").train.model_dump() | {
        "epochs": 3,
        "batch_size": 16,
        "dense_units": 32,
        "jit_compile": False,
    }
    return TrainParams(**(values | overrides))


class _InterruptAfter(keras.callbacks.Callback):
    """Ctrl-C at the end of an epoch, after its checkpoint is saved."""

    def __init__(self, epoch: int):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            raise KeyboardInterrupt


def _same_weights(first: keras.Model, second: keras.Model) -> bool:
    return all(np.array_equal(a, b) for a, b in zip(first.get_weights(), second.get_weights(), strict=True))


def test_interrupted_training_resumes_to_bit_identical_weights(prepared_dir, tmp_path):
    train_split, validation_split = load_split(prepared_dir, "train"), load_split(prepared_dir, "validation")
    params = _params()
    uninterrupted, full_history = train.train_model(params, 7, train_split, validation_split, 10, tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        train.train_model(params, 7, train_split, validation_split, 10, tmp_path / "b", callbacks=[_InterruptAfter(1)])
    assert completed_epochs(tmp_path / "b") == 2
    resumed, resumed_history = train.train_model(params, 7, train_split, validation_split, 10, tmp_path / "b")
    assert _same_weights(uninterrupted, resumed)
    assert resumed_history == full_history  # all three epochs, the first two from the interrupted run


def _train_arguments(folder, prepared_dir, params_file):
    return [
        "--params",
        str(params_file),
        "--data",
        str(prepared_dir),
        "--model",
        str(folder / "model.keras"),
        "--history",
        str(folder / "history.csv"),
        "--metrics",
        str(folder / "train.json"),
        "--run-file",
        str(folder / "run.json"),
        "--checkpoints",
        str(folder / "checkpoints"),
    ]


def _interrupt_training_after(epoch, monkeypatch):
    """Make the next train stage stop with Ctrl-C after `epoch` (0-based) is logged."""

    class Interrupting(train.EpochMetricsAndSummaryToMlflow):
        def on_epoch_end(self, index, logs=None):
            super().on_epoch_end(index, logs)
            if index == epoch:
                raise KeyboardInterrupt

    monkeypatch.setattr(train, "EpochMetricsAndSummaryToMlflow", Interrupting)


def _runs(client):
    return client.search_runs(experiment_ids=[experiment.experiment_id for experiment in client.search_experiments()])


def test_a_resumed_training_continues_its_mlflow_run_with_every_epoch_once(prepared_dir, tmp_path, monkeypatch):
    params_file = write_params(tmp_path / "params.yaml", **TINY)
    arguments = _train_arguments(tmp_path, prepared_dir, params_file)
    with monkeypatch.context() as patch:
        _interrupt_training_after(0, patch)
        with pytest.raises(KeyboardInterrupt):
            run_stage(["train", *arguments])
    client = mlflow.MlflowClient()
    [interrupted] = _runs(client)
    assert interrupted.info.status == "KILLED"
    assert not (tmp_path / "run.json").exists() and not (tmp_path / "model.keras").exists()

    run_stage(["train", *arguments])
    [finished] = _runs(client)
    assert finished.info.run_id == interrupted.info.run_id and finished.info.status == "FINISHED"
    for metric in EPOCH_METRICS:
        assert [point.step for point in client.get_metric_history(finished.info.run_id, metric)] == [1, 2, 3], metric
    assert len((tmp_path / "history.csv").read_text().splitlines()) == 1 + 3
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


def test_an_interrupted_evaluate_leaves_its_run_killed_and_its_rerun_finishes_another(
    prepared_dir, tmp_path, monkeypatch
):
    from alexnet8 import evaluate

    params_file = write_params(tmp_path / "params.yaml", **(TINY | {"train.epochs": 1}))
    run_stage(["train", *_train_arguments(tmp_path, prepared_dir, params_file)])
    arguments = ["--params", str(params_file), "--data", str(prepared_dir), "--model", str(tmp_path / "model.keras"),
                 "--run-file", str(tmp_path / "run.json"), "--metrics", str(tmp_path / "test.json"),
                 "--predictions", str(tmp_path / "predictions.csv"),
                 "--served-model", str(tmp_path / "served_model.json")]  # fmt: skip
    logged = evaluate.log_classifier

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate, "log_classifier", interrupted)  # Ctrl-C while the model is logged
    with pytest.raises(KeyboardInterrupt):
        run_stage(["evaluate", *arguments])
    client = mlflow.MlflowClient()
    training_run_id = json.loads((tmp_path / "run.json").read_text())["run_id"]
    killed = evaluation_run(client, training_run_id)
    assert killed.info.status == "KILLED" and "test/accuracy" not in killed.data.metrics
    assert client.get_run(training_run_id).info.status == "FINISHED"  # the training is not touched
    assert not (tmp_path / "test.json").exists() and not (tmp_path / "served_model.json").exists()

    monkeypatch.setattr(evaluate, "log_classifier", logged)
    run_stage(["evaluate", *arguments])
    finished = evaluation_run(client, training_run_id)
    assert finished.info.status == "FINISHED" and "test/accuracy" in finished.data.metrics


def test_a_checkpoint_from_other_params_is_not_resumed(prepared_dir, tmp_path, monkeypatch):
    arguments = _train_arguments(tmp_path, prepared_dir, write_params(tmp_path / "params.yaml", **TINY))
    with monkeypatch.context() as patch:
        _interrupt_training_after(1, patch)
        with pytest.raises(KeyboardInterrupt):
            run_stage(["train", *arguments])
    [stale] = list((tmp_path / "checkpoints").iterdir())
    write_params(tmp_path / "params.yaml", **(TINY | {"train.learning_rate": 0.0005}))
    run_stage(["train", *arguments])
    client = mlflow.MlflowClient()
    runs = {run.info.status: run for run in _runs(client)}
    assert set(runs) == {"KILLED", "FINISHED"}  # a new run, not the interrupted one continued
    assert [point.step for point in client.get_metric_history(runs["FINISHED"].info.run_id, "train/loss")] == [1, 2, 3]
    assert not stale.exists()


def test_nan_loss_fails_the_run_and_saves_no_model(prepared_dir, tmp_path):
    # A step size far too large overflows the weights within a few steps. (NaN images would not
    # do: TensorFlow's fused CPU kernels for max pooling can turn NaN inputs into finite values.)
    params = write_params(tmp_path / "params.yaml", **TINY, **{"train.learning_rate": 1e30})
    arguments = _train_arguments(tmp_path, prepared_dir, params)
    with pytest.raises(train.TrainingNotFinished, match="the loss became nan"):
        run_stage(["train", *arguments])
    [run] = _runs(mlflow.MlflowClient())
    assert run.info.status == "FAILED"
    assert not (tmp_path / "model.keras").exists() and not (tmp_path / "run.json").exists()
    assert not any((tmp_path / "checkpoints").iterdir())  # nothing diverged is left to resume


def test_a_tracking_server_that_does_not_answer_fails_before_training(prepared_dir, tmp_path, monkeypatch):
    with socket.socket() as probe:  # a port on this machine that nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    mlflow.set_tracking_uri(None)
    started = time.monotonic()
    with pytest.raises(PipelineError, match=f"tracking server at http://127.0.0.1:{port} .* does not answer"):
        run_stage(["train", *_train_arguments(tmp_path, prepared_dir, write_params(tmp_path / "params.yaml", **TINY))])
    # Not MLflow's retries (minutes): a generous bound, not a speed test.
    assert time.monotonic() - started < 60
    assert not (tmp_path / "checkpoints").exists()


def test_archive_members_that_are_links_are_refused(tmp_path):
    archive = tmp_path / "cifar.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        link = tarfile.TarInfo("cifar-10-batches-bin/data_batch_1.bin")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
        escape = tarfile.TarInfo("../../escape.bin")
        escape.size = 3
        tar.addfile(escape, io.BytesIO(b"bad"))
    with pytest.raises(DataError, match="data_batch_1.bin is not a regular file"):
        read_archive(archive)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["cifar.tar.gz"]  # nothing extracted


def test_model_files_are_loaded_in_safe_mode(tmp_path):
    inputs = keras.Input(shape=(32, 32, 3))
    outputs = keras.layers.Lambda(lambda x: x * 2)(inputs)  # arbitrary Python code in the model file
    path = tmp_path / "lambda.keras"
    keras.Model(inputs, outputs).save(path)
    with pytest.raises(DataError, match="lambda.keras: Keras safe mode refuses the code this model file holds"):
        load_trained_model(path)


@pytest.mark.slow
@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_killed_train_process_resumes_where_it_stopped(prepared_dir, tmp_path, signal_number):
    epochs = 12
    arguments = _train_arguments(
        tmp_path, prepared_dir, write_params(tmp_path / "params.yaml", **(TINY | {"train.epochs": epochs}))
    )
    command = [sys.executable, "-m", "alexnet8", "train", *arguments]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 180
    while not list((tmp_path / "checkpoints").glob("*/epoch-*/")):  # an epoch's set is complete
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[0]
        time.sleep(0.02)
    process.send_signal(signal_number)
    output = process.communicate()[0]
    stopped_after = completed_epochs(next((tmp_path / "checkpoints").iterdir()))
    assert 1 <= stopped_after < epochs, output
    client = mlflow.MlflowClient()
    [run] = _runs(client)
    if signal_number == signal.SIGTERM:
        assert process.returncode == 130 and run.info.status == "KILLED", output
        assert "resume training after the last completed epoch" in output
    else:
        assert process.returncode == -signal.SIGKILL and run.info.status == "RUNNING"  # nothing can run on SIGKILL

    rerun = subprocess.run(command, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert f"after epoch {stopped_after} of {epochs}" in rerun.stderr
    [run] = _runs(client)
    assert run.info.status == "FINISHED"
    for metric in ("train/loss", "val/accuracy"):
        assert [point.step for point in client.get_metric_history(run.info.run_id, metric)] == list(
            range(1, epochs + 1)
        ), metric
    assert len((tmp_path / "history.csv").read_text().splitlines()) == 1 + epochs


def test_an_interrupted_stage_other_than_train_does_not_talk_about_training():
    stage = "from alexnet8 import cli\ndef stage(argv):\n    raise KeyboardInterrupt\ncli.run(stage)"
    result = subprocess.run([sys.executable, "-c", stage], capture_output=True, text=True, timeout=60)
    assert result.returncode == 130
    assert "interrupted; nothing half-written was left" in result.stderr and "training" not in result.stderr


@pytest.mark.parametrize("damage", ["truncated", "overwritten", "empty"])
def test_a_damaged_model_file_says_what_is_wrong_not_safe_mode(tmp_path, damage):
    from alexnet8.network import build_alexnet8

    path = tmp_path / "model.keras"
    build_alexnet8(dense_units=8).save(path)
    content = path.read_bytes()
    path.write_bytes(
        {"truncated": content[: len(content) // 2], "overwritten": b"x" * len(content), "empty": b""}[damage]
    )
    with pytest.raises(DataError, match=r"model.keras is not a Keras model file \(damaged or cut short\?\): restore"):
        load_trained_model(path)


@pytest.mark.parametrize("damage", ["truncated", "same size"])
def test_a_damaged_prepared_array_is_named_with_the_fix(prepared_dir, tmp_path, damage):
    import shutil

    shutil.copytree(prepared_dir, tmp_path / "prepared")
    path = tmp_path / "prepared" / "train_images.npy"
    content = bytearray(path.read_bytes())
    if damage == "truncated":
        del content[-100:]
    else:
        content[-100:] = bytes(100)  # same size, other pixels: only the md5 tells
    path.write_bytes(bytes(content))
    with pytest.raises(DataError, match=r"train_images.npy is damaged .*`dvc checkout .*prepared`"):
        load_split(tmp_path / "prepared", "train")


def test_a_damaged_mlflow_store_is_named_before_any_work(tmp_path, monkeypatch):
    from alexnet8 import tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.chdir(project)
    with tracking.start_pipeline_run("local", "first", project / "run.json"):
        pass
    database = project / "mlflow.db"
    content = bytearray(database.read_bytes())
    content[100:4096] = b"\xff" * (4096 - 100)  # the first page's b-tree: garbage
    database.write_bytes(bytes(content))
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    started = time.monotonic()
    with (
        pytest.raises(PipelineError, match=r"mlflow.db is damaged .*mv .*mlflow.db .*mlflow.db.damaged"),
        tracking.start_pipeline_run("local", "second", project / "run2.json"),
    ):
        pass
    assert time.monotonic() - started < 60  # refused at once, not after MLflow's retries (a bound, not a speed test)


def _restore_command(message: str) -> list[str]:
    found = re.search(r"`(dvc checkout [^`]+)`", message)
    assert found, message
    return shlex.split(found.group(1))


def test_the_restore_command_the_messages_give_works_with_real_dvc(prepared_dir, tmp_path, monkeypatch):
    """`dvc checkout <path>` refuses to replace a changed output (exit 255, "Use --force"): the
    command the messages give must restore a damaged prepared array and model file."""
    from alexnet8.network import build_alexnet8

    project = tmp_path / "project"
    project.mkdir()
    build_alexnet8(dense_units=8).save(tmp_path / "made.keras")
    stages = {
        "prepare": {"cmd": f"mkdir -p data && cp -r {prepared_dir} data/prepared", "outs": ["data/prepared"]},
        "train": {
            "cmd": f"mkdir -p models && cp {tmp_path / 'made.keras'} models/model.keras",
            "outs": ["models/model.keras"],
        },
    }
    (project / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    run_command(["dvc", "init", "--no-scm", "-q"], project)
    run_command(["dvc", "repro", "-q"], project)
    monkeypatch.chdir(project)

    images = project / "data/prepared/train_images.npy"
    images.write_bytes(images.read_bytes()[:-100] + bytes(100))
    with pytest.raises(DataError) as damaged:
        load_split("data/prepared", "train")
    run_command(_restore_command(str(damaged.value)), project)
    assert len(load_split("data/prepared", "train").labels) > 0

    model = project / "models/model.keras"
    model.write_bytes(model.read_bytes()[:1000])
    with pytest.raises(DataError) as damaged:
        load_trained_model("models/model.keras")
    run_command(_restore_command(str(damaged.value)), project)
    assert load_trained_model("models/model.keras").count_params() > 0


def test_dvcs_cache_on_a_full_disk_is_repaired_by_the_commands_the_docs_give(small_disk, tmp_path):
    """docs/operations.md, measured with real dvc: when the cache's disk fills, `dvc repro` says
    `failed to transfer` but exits 0 and leaves `.tmp` files; `dvc commit --force <stage>` stores
    the outputs once there is space, and `dvc gc -w -A --all-experiments` removes the `.tmp` files."""
    cache = small_disk("256k")
    project = tmp_path / "project"
    project.mkdir()
    (project / "make.py").write_text(
        "import os\nos.makedirs('out', exist_ok=True)\n"
        "for i in range(3):\n    open(f'out/{i}.bin', 'wb').write(os.urandom(200_000))\n"
    )
    (project / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"make": {"cmd": "python make.py", "outs": ["out"]}}}))
    run_command(["git", "init", "-q"], project)
    run_command(["dvc", "init", "-q"], project)
    run_command(["dvc", "cache", "dir", "--local", str(cache)], project)
    commit_all(project, "a stage whose outputs do not fit the cache")

    output = run_command(["dvc", "repro"], project)  # exit status 0, or run_command raises
    assert "failed to transfer" in output and "No space left on device" in output, output
    assert "not in cache:" in run_command(["dvc", "status"], project)
    assert list(cache.rglob("*.tmp"))

    subprocess.run(["mount", "-o", "remount,size=8m", str(cache)], check=True)
    run_command(["dvc", "commit", "--force", "make"], project)
    assert "up to date" in run_command(["dvc", "status"], project)
    run_command(["dvc", "gc", "--workspace", "--all-commits", "--all-experiments", "--force"], project)
    assert list(cache.rglob("*.tmp")) == []
    shutil.rmtree(project / "out")
    run_command(["dvc", "checkout"], project)  # everything in use is still in the cache
    assert len(list((project / "out").iterdir())) == 3


def test_a_full_disk_when_the_model_is_saved_names_the_folder_and_leaves_no_file(tmp_path, monkeypatch):
    import errno

    from alexnet8.network import build_alexnet8

    def full_disk(self, path, *args, **kwargs):
        Path(path).write_bytes(b"half a model")
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(keras.Model, "save", full_disk)
    with pytest.raises(PipelineError, match=r"no space left on the device of .*models: the trained model needs more"):
        train.save_model(build_alexnet8(dense_units=16), tmp_path / "models" / "model.keras")
    assert list((tmp_path / "models").iterdir()) == []  # nothing half-written
