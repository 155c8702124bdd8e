"""A real `mlflow server` that dies during training costs seconds: epochs go on at full speed, the
model is saved and the stage fails saying "rerun to log it", Ctrl-C acts at once, and the rerun
after the server is back leaves a complete run (every epoch once, the model).

The server runs as a process of its own (SQLite store, artifacts served through it) on a free
port, and is killed with SIGKILL, as a crash or the OOM killer would; the train stage runs as
`python -m alexnet8 train`, as dvc.yaml runs it.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from cifar_archive import make_cifar_archive
from helpers import PROJECT_ROOT, TrackingServer, activated_environment, write_params

from alexnet8.metric_names import EPOCH_METRICS
from alexnet8.params import load_params
from alexnet8.tracking import RESTART_GRACE_SECONDS

pytestmark = pytest.mark.slow

EPOCHS = 3
PARAMS = {"train.epochs": EPOCHS, "train.batch_size": 16, "train.dense_units": 32}


@pytest.fixture
def server(tmp_path):
    folder = tmp_path / "server"
    folder.mkdir()
    tracking_server = TrackingServer(folder)
    tracking_server.start()
    yield tracking_server
    tracking_server.kill()


@pytest.fixture(scope="module")
def slow_prepared(tmp_path_factory) -> Path:
    """450 training images: an epoch of the tiny model takes a few seconds, time to kill the server."""
    from alexnet8.preprocess import preprocess

    folder = tmp_path_factory.mktemp("slow")
    make_cifar_archive(folder / "cifar-10-binary.tar.gz", per_batch=100, test_count=40, seed=3)
    params = load_params(PROJECT_ROOT / "params.yaml")
    preprocess(folder / "cifar-10-binary.tar.gz", folder / "prepared", params.preprocess, params.seed)
    return folder / "prepared"


class Stage:
    """`python -m alexnet8 train` in a process of its own, its log lines collected with the time each arrived."""

    def __init__(self, folder: Path, prepared: Path, tracking_uri: str):
        params = write_params(folder / "params.yaml", **PARAMS)
        self.folder = folder
        self.command = [
            sys.executable, "-m", "alexnet8", "train", "--params", str(params), "--data", str(prepared),
            "--model", str(folder / "model.keras"), "--history", str(folder / "history.csv"),
            "--metrics", str(folder / "train.json"), "--run-file", str(folder / "run.json"),
            "--checkpoints", str(folder / "checkpoints"),
        ]  # fmt: skip
        # This checkout's code, whatever the environment has installed.
        self.environment = activated_environment(
            PYTHONPATH=str(PROJECT_ROOT / "src"), MLFLOW_TRACKING_URI=tracking_uri, ALEXNET8_LOG_LEVEL="INFO"
        )
        self.lines: list[tuple[float, str]] = []
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.lines = []
        self.process = subprocess.Popen(
            self.command,
            cwd=self.folder,
            env=self.environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            # Ctrl-C's default action, whatever this test process was started with.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append((time.monotonic(), line))

    def output(self) -> str:
        return "".join(line for _, line in self.lines)

    def wait_for(self, pattern: str, timeout: float = 300) -> float:
        """Wait for a log line matching `pattern`; when it arrived."""
        deadline = time.monotonic() + timeout
        while True:
            for arrived, line in self.lines:
                if re.search(pattern, line):
                    return arrived
            assert self.process.poll() is None, f"the stage ended before {pattern!r}:\n{self.output()}"
            assert time.monotonic() < deadline, f"no {pattern!r} within {timeout} s:\n{self.output()}"
            time.sleep(0.05)

    def finish(self, timeout: float = 300) -> tuple[int, float]:
        """Wait for the stage to end; its exit status and when it ended."""
        returncode = self.process.wait(timeout=timeout)
        ended = time.monotonic()
        self._reader.join(timeout=10)
        return returncode, ended


def _epoch_done(epoch: int) -> str:
    return rf"epoch {epoch}/{EPOCHS} done in"


def test_a_server_killed_during_epoch_2_costs_seconds_and_the_rerun_completes_the_run(server, slow_prepared, tmp_path):
    stage = Stage(tmp_path, slow_prepared, server.uri)
    stage.start()
    first_done = stage.wait_for(_epoch_done(1))
    time.sleep(0.5)  # into epoch 2; epoch 1's metrics are sent meanwhile
    server.kill()
    second_done = stage.wait_for(_epoch_done(2))
    third_done = stage.wait_for(_epoch_done(3))
    returncode, ended = stage.finish()
    output = stage.output()
    print(output)  # pytest -s shows the stage's log and the times measured
    print(
        f"epoch 2 (server killed 0.5 s in): {second_done - first_done:.1f} s, epoch 3 (server gone): "
        f"{third_done - second_done:.1f} s, last epoch's end to exit: {ended - third_done:.1f} s"
    )

    assert returncode == 1, output
    assert "Traceback" not in output, output
    assert re.search(r"WARNING .*MLflow at http://127.0.0.1:\d+ does not answer \(.*Connection refused\)", output)
    assert re.search(
        r"ERROR alexnet8: the model is trained and saved in .*model.keras, but MLflow at http://127.0.0.1:\d+ "
        r"does not take its last epochs' metrics \(.*Connection refused\): rerun once the server answers",
        output,
    ), output
    # Epoch 3 ran with the server gone: it took no longer than epoch 2 (which started with the
    # server up) but for noise; a client waiting for the dead server would add seconds per epoch.
    assert third_done - second_done < (second_done - first_done) + 1.5, output
    # After the last epoch: a restart's grace for the server, then one bounded try of each request.
    assert ended - third_done < RESTART_GRACE_SECONDS + 20, output
    assert (tmp_path / "model.keras").is_file() and not (tmp_path / "run.json").exists()
    [checkpoint] = (tmp_path / "checkpoints").iterdir()  # the state the rerun resumes from

    server.start()  # on the same port and store
    stage.start()
    returncode, _ = stage.finish()
    output = stage.output()
    assert returncode == 0, output
    assert f"after epoch {EPOCHS} of {EPOCHS}" in output  # nothing retrained
    client = server.client()
    run_id = json.loads((tmp_path / "run.json").read_text())["run_id"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    [only_run] = client.search_runs([run.info.experiment_id])  # the same run, continued
    assert only_run.info.run_id == run_id
    for metric in EPOCH_METRICS:
        assert [point.step for point in client.get_metric_history(run_id, metric)] == list(range(1, EPOCHS + 1)), metric
    assert "model_summary.txt" in {artifact.path for artifact in client.list_artifacts(run_id)}


@pytest.mark.parametrize("moment", ["during an epoch", "while waiting for the server at the end"])
def test_ctrl_c_with_the_server_gone_exits_130_without_mlflows_retries(server, slow_prepared, tmp_path, moment):
    stage = Stage(tmp_path, slow_prepared, server.uri)
    stage.start()
    stage.wait_for(_epoch_done(1))
    server.kill()
    if moment == "during an epoch":
        stage.wait_for(_epoch_done(2))
        time.sleep(0.5)  # into epoch 3
    else:
        stage.wait_for(r"waiting up to \d+ s for it")
        time.sleep(2)
    interrupted = time.monotonic()
    stage.process.send_signal(signal.SIGINT)
    returncode, ended = stage.finish(timeout=60)
    output = stage.output()
    print(f"Ctrl-C {moment}: exit {returncode} after {ended - interrupted:.2f} s")
    assert returncode == 130, output
    # A bound, not a speed test: with MLflow's default retries the run's status would be retried for
    # minutes; the stage's last request is one try (tracking.LAST_REQUEST_BOUNDS).
    assert ended - interrupted < 15, output
    assert "interrupted; run the stage again (`dvc repro`) to resume training" in output, output
    # Why the run's status was not taken: the connection, not the Ctrl-C being handled.
    assert re.search(r"did not take run \w+'s status KILLED \(ConnectionRefusedError: .*Connection refused\)", output)
    assert "Traceback" not in output, output
