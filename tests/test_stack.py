"""The team stack (docs/team.md): `make stack-up` starts PostgreSQL, SeaweedFS (S3) and an MLflow
server with basic auth on 127.0.0.1, in a fresh clone, on free ports; the pipeline runs against it
as docs/team.md says (`source .stack/env`, then plain `dvc`), its outputs travel through the DVC
remote, nobody gets in without credentials, faults are survived, and eight clients at once lose
nothing. The last test stops the stack and checks that no process is left.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import random
import re
import signal
import socket
import stat
import subprocess
import textwrap
import time
import urllib.error
import urllib.request
from base64 import b64encode
from pathlib import Path

import mlflow
import pytest
import yaml
from cifar_archive import make_cifar_archive
from helpers import (
    activated_environment,
    commit_all,
    evaluation_run,
    fresh_clone,
    link_test_environment,
    load_script,
    make,
    minimal_environment,
)
from helpers import run_command as run

from alexnet8.metric_names import EPOCH_METRICS

pytestmark = pytest.mark.stack

stack_script = load_script("stack/stack.py")

EXPERIMENT = "alexnet8-cifar10"
MODEL = "alexnet8-cifar10"
TINY = {"train.epochs": 2, "train.batch_size": 16, "train.dense_units": 16}
QUEUED = 4  # experiments in the queue, run two at a time


# The stack, on free ports, in a fresh clone -----------------------------------------------------


def _free(host: str, port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def _free_ports() -> dict[str, str]:
    """STACK_* settings with ports nothing listens on (the S3 port and the 7 after it, see stack.py)."""
    rng = random.Random()
    while True:
        mlflow_port, postgres_port, s3_port = (rng.randrange(20000, 30000) for _ in range(3))
        s3_ports = [s3_port, *(s3_port + offset for offset in (1, 2, 3))]
        ports = [mlflow_port, postgres_port, *s3_ports, *(port + 10000 for port in s3_ports)]
        if len(set(ports)) == len(ports) and all(_free("127.0.0.1", port) for port in ports):
            return {
                "STACK_MLFLOW_PORT": str(mlflow_port),
                "STACK_POSTGRES_PORT": str(postgres_port),
                "STACK_S3_PORT": str(s3_port),
            }


def tiny_project(destination: Path, archive: Path, md5: str, **overrides: object) -> Path:
    root = fresh_clone(destination)
    link_test_environment(root)
    params = yaml.safe_load((root / "params.yaml").read_text())
    for dotted, value in {"fetch.url": archive.as_uri(), "fetch.md5": md5, **TINY, **overrides}.items():
        section, key = dotted.split(".")
        params[section][key] = value
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    commit_all(root, "project on a tiny archive")
    return root


def client_settings(project: Path) -> dict[str, str]:
    """The variables `.stack/env` exports (read as `source .stack/env` would)."""
    return dict(re.findall(r"^export (\w+)=(.*)$", (project / ".stack/env").read_text(), re.MULTILINE))


class Stack:
    """The stack of one project, as its tests see it."""

    def __init__(self, project: Path):
        self.project = project
        self.folder = project / ".stack"

    @property
    def state(self) -> dict:
        return json.loads((self.folder / "stack.json").read_text())

    @property
    def tracking_uri(self) -> str:
        return client_settings(self.project)["MLFLOW_TRACKING_URI"]

    def environment(self, **extra: str) -> dict[str, str]:
        """A shell after `source .venv/bin/activate` and `source .stack/env`."""
        return activated_environment(self.project, **(client_settings(self.project) | extra))

    def client(self) -> mlflow.MlflowClient:
        """A client of the server, with the credentials of .stack/env (set in this process)."""
        settings = client_settings(self.project)
        os.environ["MLFLOW_TRACKING_USERNAME"] = settings["MLFLOW_TRACKING_USERNAME"]
        os.environ["MLFLOW_TRACKING_PASSWORD"] = settings["MLFLOW_TRACKING_PASSWORD"]
        return mlflow.MlflowClient(tracking_uri=settings["MLFLOW_TRACKING_URI"])

    def s3(self):
        import boto3

        secrets = self.state["secrets"]
        return boto3.client(
            "s3",
            endpoint_url=f"http://127.0.0.1:{self.state['settings']['s3_port']}",
            aws_access_key_id=secrets["s3_access_key"],
            aws_secret_access_key=secrets["s3_secret_key"],
            region_name=stack_script.S3_REGION,
        )

    def keys(self, prefix: str = "") -> list[str]:
        pages = (
            self.s3().get_paginator("list_objects_v2").paginate(Bucket=self.state["settings"]["bucket"], Prefix=prefix)
        )
        return [item["Key"] for page in pages for item in page.get("Contents", [])]

    def pid(self, component: str) -> int:
        return json.loads((self.folder / f"{component}.pid").read_text())["pid"]

    def processes(self) -> set[int]:
        """Every process of the three servers (the servers, their workers, PostgreSQL's backends)."""
        found = set()
        for component in stack_script.COMPONENTS:
            with contextlib.suppress(FileNotFoundError):
                found |= stack_script.process_family(self.pid(component))
        return found

    def crash(self, component: str) -> None:
        """SIGKILL a server and all its processes, as a crash or the OOM killer would."""
        for pid in stack_script.process_family(self.pid(component)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while stack_script.alive(stack_script.process_family(self.pid(component))):
            assert time.monotonic() < deadline, f"{component} survived SIGKILL"
            time.sleep(0.1)

    def restart(self, component: str) -> None:
        """A clean stop of one server (PostgreSQL: fast shutdown), then `make stack-up`."""
        stack_script.ProcessSupervisor(self.folder).stop(component)
        make(self.project, "stack-up")


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_archive) -> Stack:
    """A fresh clone on the tiny archive, with its stack up (`make stack-up`, free ports)."""
    project = tiny_project(tmp_path_factory.mktemp("team"), *tiny_archive)
    stack = Stack(project)
    try:
        started = time.monotonic()
        output = make(project, "stack-up", **_free_ports())
        print(f"make stack-up: {time.monotonic() - started:.1f} s\n{output}")
        yield stack
    finally:
        with contextlib.suppress(Exception):
            make(project, "stack-down")
        for pid in stack_script.alive(stack.processes()):
            os.kill(pid, signal.SIGKILL)


def _runs(client: mlflow.MlflowClient, filter_string: str = "") -> list:
    """The training runs (not the evaluations nested in them)."""
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], filter_string) if experiment else []
    return [run_ for run_ in runs if "mlflow.parentRunId" not in run_.data.tags]


def assert_complete(client: mlflow.MlflowClient, run, epochs: int) -> None:
    """FINISHED, every epoch's metrics exactly once, the test metrics, the figures, a logged model."""
    run_id = run.info.run_id
    assert run.info.status == "FINISHED", run.info
    for metric in EPOCH_METRICS:
        assert [point.step for point in client.get_metric_history(run_id, metric)] == list(range(1, epochs + 1)), metric
    assert {"training_curves.png", "confusion_matrix.png"} <= {
        artifact.path for artifact in client.list_artifacts(run_id)
    }
    evaluation = evaluation_run(client, run_id)
    assert {"test/accuracy", "test/loss"} <= set(evaluation.data.metrics)
    models = client.search_logged_models([run.info.experiment_id], f"source_run_id = '{evaluation.info.run_id}'")
    # One model; a try that failed to upload it stays listed as FAILED.
    assert [str(model.status) for model in models if str(model.status) != "FAILED"] == ["READY"], models


# The stack and its state -------------------------------------------------------------------------


def test_stack_up_again_finds_everything_running(stack):
    output = make(stack.project, "stack-up")
    for component in ("postgres", "seaweedfs", "mlflow"):
        assert f"{component} is already running" in output
    assert "starting" not in output
    assert "postgres  running" in make(stack.project, "stack-status")


def _secret_values(secrets: dict) -> list[bytes]:
    values = [value for value in secrets.values() if isinstance(value, str)] + secrets["seaweedfs_jwt_keys"]
    return [value.encode() for value in values]


def _holds_any(path: Path, secrets: list[bytes]) -> bool:
    content = path.read_bytes()
    return any(secret in content for secret in secrets)


def test_every_file_that_holds_a_secret_is_private(stack):
    """Every file `make stack-up` wrote (in .stack/ and the project's .dvc/config.local, which
    `make setup` made first) that holds a password or key is 0600, in a 0700 folder."""
    assert stat.S_IMODE(stack.folder.stat().st_mode) == 0o700
    secrets = _secret_values(stack.state["secrets"])
    written = [path for path in stack.folder.rglob("*") if path.is_file() and not path.is_symlink()]
    holding = [path for path in [*written, stack.project / ".dvc/config.local"] if _holds_any(path, secrets)]
    names = {str(path.relative_to(stack.project)) for path in holding}
    expected = {"stack.json", "env", "pgpass", "mlflow/basic_auth.ini", "seaweedfs/s3.json", "seaweedfs/security.toml"}
    assert {f".stack/{name}" for name in expected} | {".dvc/config.local"} <= names, names
    modes = {str(path.relative_to(stack.project)): oct(stat.S_IMODE(path.stat().st_mode)) for path in holding}
    assert {name: mode for name, mode in modes.items() if mode != "0o600"} == {}, modes


PIPELINE_FILES = {"dvc.lock", "models/mlflow_run.json", "models/served_model.json"}


def test_the_state_is_out_of_git(stack):
    run(["git", "check-ignore", "-q", ".stack/env"], stack.project, minimal_environment())
    # Whatever ran before, nothing of the stack is for git: only a pipeline's own files may show.
    porcelain = run(["git", "status", "--porcelain"], stack.project, minimal_environment()).splitlines()
    assert [line for line in porcelain if line[3:] not in PIPELINE_FILES] == []
    # The remote's keys are in .dvc/config.local, which DVC keeps out of git; .dvc/config has no remote.
    local = (stack.project / ".dvc/config.local").read_text()
    assert stack.state["secrets"]["s3_secret_key"] in local and "endpointurl" in local
    assert "remote" not in (stack.project / ".dvc/config").read_text()


def test_the_admin_password_is_generated(stack):
    password = client_settings(stack.project)["MLFLOW_TRACKING_PASSWORD"]
    assert len(password) >= 24 and password != "password1234"
    assert f"admin_password = {password}" in (stack.folder / "mlflow/basic_auth.ini").read_text()


# Nobody gets in who should not --------------------------------------------------------------------


def _status(url: str, user: str | None = None, password: str | None = None) -> int:
    request = urllib.request.Request(url)
    if user:
        request.add_header("Authorization", "Basic " + b64encode(f"{user}:{password}".encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_mlflow_requests_without_or_with_wrong_credentials_get_401(stack):
    search = f"{stack.tracking_uri}/api/2.0/mlflow/experiments/search?max_results=10"
    password = client_settings(stack.project)["MLFLOW_TRACKING_PASSWORD"]
    assert _status(search) == 401
    assert _status(search, "admin", "wrong-password") == 401
    assert _status(search, "admin", "password1234") == 401
    assert _status(search, "nobody", password) == 401
    assert _status(f"{stack.tracking_uri}/api/2.0/mlflow-artifacts/artifacts") == 401  # the artifacts proxy too
    assert _status(search, "admin", password) == 200


def test_the_admin_adds_a_teammate_who_reads_but_does_not_write_others_runs(stack, repro, tmp_path):
    """docs/team.md: a user per person, made by the admin; default_permission READ."""
    script = textwrap.dedent(
        """
        from mlflow.server import get_app_client
        get_app_client("basic-auth", tracking_uri=__import__("os").environ["MLFLOW_TRACKING_URI"]).create_user(
            "alice", "alice-password-0123456789"
        )
        """
    )
    run(["python", "-c", script], tmp_path, stack.environment())
    run_url = f"{stack.tracking_uri}/api/2.0/mlflow/runs/get?run_id={repro}"
    assert _status(run_url, "alice", "alice-password-0123456789") == 200
    assert _status(run_url, "alice", "wrong") == 401
    alice = stack.environment(MLFLOW_TRACKING_USERNAME="alice", MLFLOW_TRACKING_PASSWORD="alice-password-0123456789")
    refused = subprocess.run(
        ["python", "-c", f"import mlflow; mlflow.MlflowClient().set_tag('{repro}', 'by', 'alice')"],
        cwd=tmp_path,
        env=alice | {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"},
        capture_output=True,
        text=True,
    )
    assert refused.returncode != 0 and "error code 403" in refused.stderr, refused.stderr[-2000:]


def test_mlflow_refuses_other_host_headers(stack):
    """--allowed-hosts: a page that rebinds its own name to 127.0.0.1 can not talk to the server."""
    port = stack.state["settings"]["mlflow_port"]
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    password = client_settings(stack.project)["MLFLOW_TRACKING_PASSWORD"]
    authorization = "Basic " + b64encode(f"admin:{password}".encode()).decode()
    for host, expected in ((f"attacker.example:{port}", 403), (f"127.0.0.1:{port}", 200)):
        connection.request(
            "GET",
            "/api/2.0/mlflow/experiments/search?max_results=1",
            headers={"Host": host, "Authorization": authorization},
        )
        response = connection.getresponse()
        response.read()
        assert response.status == expected, host


def test_the_object_store_requires_its_keys(stack):
    import boto3
    import botocore
    from botocore.config import Config

    endpoint = f"http://127.0.0.1:{stack.state['settings']['s3_port']}"
    bucket = stack.state["settings"]["bucket"]
    anonymous = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=stack_script.S3_REGION,
        config=Config(signature_version=botocore.UNSIGNED),
    )
    wrong = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=stack_script.S3_REGION,
        aws_access_key_id=stack.state["secrets"]["s3_access_key"],
        aws_secret_access_key="wrong-secret",
    )
    for client in (anonymous, wrong):
        with pytest.raises(botocore.exceptions.ClientError) as refused:
            client.list_objects_v2(Bucket=bucket)
        assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    stack.s3().list_objects_v2(Bucket=bucket)
    # Behind S3, the filer's own HTTP port holds the same files: it wants a signed token.
    filer = stack.state["settings"]["s3_port"] + 3
    assert _status(f"http://127.0.0.1:{filer}/buckets/{bucket}/") == 401


def test_every_server_listens_on_127_0_0_1_only(stack):
    import psutil

    listening = {
        (connection.laddr.ip, connection.pid)
        for connection in psutil.net_connections("inet")
        if connection.status == psutil.CONN_LISTEN and connection.pid in stack.processes()
    }
    assert {pid for _, pid in listening} >= {stack.pid("postgres"), stack.pid("seaweedfs")}
    assert {address for address, _ in listening} == {"127.0.0.1"}, listening


# The pipeline against the stack -------------------------------------------------------------------


@pytest.fixture(scope="module")
def repro(stack) -> str:
    """`source .stack/env && dvc repro` in the project: its run id."""
    started = time.monotonic()
    run(["dvc", "repro"], stack.project, stack.environment())
    print(f"dvc repro against the stack: {time.monotonic() - started:.1f} s")
    return json.loads((stack.project / "models/mlflow_run.json").read_text())["run_id"]


def test_dvc_repro_logs_the_run_to_the_server(stack, repro):
    client = stack.client()
    run_ = client.get_run(repro)
    assert_complete(client, run_, epochs=2)
    assert run_.data.params["train.dense_units"] == "16" and run_.data.params["fetch.md5"]
    record = json.loads((stack.project / "models/mlflow_run.json").read_text())
    served = json.loads((stack.project / "models/served_model.json").read_text())
    assert record["tracking_uri"] == stack.tracking_uri and served["registered_model"] == MODEL


def test_the_artifacts_are_in_the_object_store_not_on_disk(stack, repro):
    run_ = stack.client().get_run(repro)
    assert run_.info.artifact_uri.startswith("mlflow-artifacts:"), run_.info.artifact_uri  # served by the server
    keys = stack.keys("mlflow/")
    prefix = f"mlflow/{run_.info.experiment_id}/{repro}/artifacts/"
    for artifact in ("training_curves.png", "confusion_matrix.png", "provenance/params.yaml"):
        assert prefix + artifact in keys, artifact
    assert any(key.endswith("/artifacts/model.keras") for key in keys)  # the logged model's file
    for local in ("mlflow.db", "mlruns", "mlartifacts", ".stack/mlflow/mlartifacts"):
        assert not (stack.project / local).exists(), local


def test_outputs_travel_through_the_remote(stack, repro, tmp_path):
    """docs/team.md: commit, `dvc push -r stack`; a clone with the remote configured pulls it all."""
    project = stack.project
    run(["git", "add", "dvc.lock", "params.yaml", "reports/", "models/mlflow_run.json"], project, minimal_environment())
    commit_all(project, "run on the stack")
    run(["dvc", "push", "-r", "stack"], project, stack.environment())
    assert any(key.startswith("dvc/files/md5/") for key in stack.keys("dvc/"))

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(project), str(clone)], tmp_path, minimal_environment())
    settings = stack.state
    endpoint = f"http://127.0.0.1:{settings['settings']['s3_port']}"
    for command in [
        ["dvc", "remote", "add", "--local", "stack", f"s3://{settings['settings']['bucket']}/dvc"],
        ["dvc", "remote", "modify", "--local", "stack", "endpointurl", endpoint],
        ["dvc", "remote", "modify", "--local", "stack", "access_key_id", settings["secrets"]["s3_access_key"]],
        ["dvc", "remote", "modify", "--local", "stack", "secret_access_key", settings["secrets"]["s3_secret_key"]],
    ]:
        run(command, clone)
    assert not (clone / "models/model.keras").exists()
    run(["dvc", "pull", "-r", "stack"], clone)
    for relative in (
        "data/raw/cifar-10-binary.tar.gz",
        "data/prepared/dataset.json",
        "models/model.keras",
        "reports/test_metrics.json",
        "reports/figures/confusion_matrix.png",
    ):
        assert (clone / relative).is_file(), relative
    assert (clone / "models/model.keras").read_bytes() == (project / "models/model.keras").read_bytes()
    assert "Data and pipelines are up to date" in run(["dvc", "status"], clone)
    output = run(["dvc", "repro"], clone, stack.environment())
    assert "Running stage" not in output and "Data and pipelines are up to date" in output


def test_another_clone_loads_the_model_through_the_server(stack, repro, tmp_path):
    """Only .stack/env's variables: no S3 keys, no file of the project that logged it."""
    script = textwrap.dedent(
        """
        import mlflow, numpy as np
        model = mlflow.pyfunc.load_model("models:/alexnet8-cifar10@champion")
        print(model.predict(np.zeros((3, 32, 32, 3), dtype=np.uint8)).shape)
        """
    )
    output = run(["python", "-c", script], tmp_path, stack.environment())
    assert "(3, 11)" in output.splitlines()  # 3 images: the class and 10 probabilities each


def test_queued_experiments_run_two_at_a_time_and_all_finish(stack, repro):
    project = stack.project
    # None of them the committed params' 0.001: an experiment with nothing changed runs no stage.
    rates = {f"queued-{index}": round(0.0011 + 0.0001 * index, 4) for index in range(QUEUED)}
    for name, rate in rates.items():
        run(
            ["dvc", "exp", "run", "--queue", "-n", name, "-S", f"train.learning_rate={rate}"],
            project,
            stack.environment(),
        )
    started = time.monotonic()
    run(["dvc", "queue", "start", "-j", "2"], project, stack.environment())
    status = _wait_for_queue(project, stack.environment())
    print(f"{QUEUED} queued experiments, 2 workers: {time.monotonic() - started:.1f} s")
    assert all(re.search(rf"{name}\s.*Success", status) for name in rates), status
    client = stack.client()
    runs = {run_.data.tags.get("dvc.experiment"): run_ for run_ in _runs(client)}
    for name, rate in rates.items():
        assert name in runs, {name: run_.info.status for name, run_ in runs.items()}
        run_ = runs[name]
        assert run_.data.params["train.learning_rate"] == str(rate)
        assert_complete(client, run_, epochs=2)


def _wait_for_queue(project: Path, environment: dict[str, str], timeout: float = 900) -> str:
    deadline = time.monotonic() + timeout
    while re.search(r"\b(Queued|Running)\b", status := run(["dvc", "queue", "status"], project, environment)):
        assert time.monotonic() < deadline, f"the queue did not finish in {timeout} s:\n{status}"
        time.sleep(3)
    return status


# Faults ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slow_archive(tmp_path_factory) -> tuple[Path, str]:
    """500 training images: an epoch of the tiny model takes a few seconds, time to break something."""
    path = tmp_path_factory.mktemp("slow-archive") / "cifar-10-binary.tar.gz"
    return path, make_cifar_archive(path, per_batch=100, test_count=40, seed=3)


@pytest.fixture
def faulty(stack, slow_archive, tmp_path):
    """A second clone, logging to the same stack, whose training runs 3 epochs of a few seconds each."""
    project = tiny_project(tmp_path / "faulty", *slow_archive, **{"train.epochs": 3})
    return project


def _start_repro(project: Path, environment: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "w") as output:
        return subprocess.Popen(
            ["dvc", "repro"], cwd=project, env=environment, stdout=output, stderr=subprocess.STDOUT, text=True
        )


def _wait_for_epoch_logged(stack: Stack, project: Path, process: subprocess.Popen, log: Path, epoch: int) -> str:
    """Wait until the server holds epoch `epoch`'s loss of the training running in `project`; its run id."""
    client = stack.client()
    deadline = time.monotonic() + 600
    while True:
        assert process.poll() is None, f"dvc repro ended early:\n{log.read_text()}"
        assert time.monotonic() < deadline, log.read_text()
        records = list((project / "checkpoints").glob("*/mlflow_run.json"))
        if records:
            run_id = json.loads(records[0].read_text())["run_id"]
            if epoch in {point.step for point in client.get_metric_history(run_id, "train/loss")}:
                return run_id
        time.sleep(0.2)


def _finish(process: subprocess.Popen, log: Path, timeout: float = 900) -> tuple[int, str]:
    returncode = process.wait(timeout=timeout)
    return returncode, log.read_text()


def test_mlflow_server_killed_during_an_epoch_and_restarted(stack, faulty, tmp_path):
    """The server dies during epoch 2 of 3 and comes back ~20 s later: training goes on, the epochs'
    metrics are sent when it answers again (the end of training waits up to 30 s for it), and the
    run holds every epoch once."""
    log = tmp_path / "repro.log"
    process = _start_repro(faulty, stack.environment(), log)
    run_id = _wait_for_epoch_logged(stack, faulty, process, log, epoch=1)
    stack.crash("mlflow")
    time.sleep(3)
    make(stack.project, "stack-up")
    returncode, output = _finish(process, log)
    assert returncode == 0, output
    assert json.loads((faulty / "models/mlflow_run.json").read_text())["run_id"] == run_id
    client = stack.client()
    assert_complete(client, client.get_run(run_id), epochs=3)


def test_postgres_restarted_during_an_epoch(stack, faulty, tmp_path):
    log = tmp_path / "repro.log"
    process = _start_repro(faulty, stack.environment(), log)
    run_id = _wait_for_epoch_logged(stack, faulty, process, log, epoch=1)
    stack.restart("postgres")
    returncode, output = _finish(process, log)
    assert returncode == 0, output
    client = stack.client()
    assert_complete(client, client.get_run(run_id), epochs=3)


def _wait_for_output(process: subprocess.Popen, log: Path, pattern: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not re.search(pattern, log.read_text()):
        assert process.poll() is None, f"dvc repro ended early:\n{log.read_text()}"
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.2)


def test_postgres_down_at_the_end_of_training_is_waited_for(stack, faulty, tmp_path):
    """PostgreSQL is killed during epoch 2 and started again once training has ended: meanwhile the
    MLflow server answers /health but 503 to everything else. The stage takes that for a server that
    does not answer, waits for it at the end of training, then logs everything into the same run."""
    log = tmp_path / "repro.log"
    process = _start_repro(faulty, stack.environment(), log)
    run_id = _wait_for_epoch_logged(stack, faulty, process, log, epoch=1)
    stack.crash("postgres")
    _wait_for_output(process, log, r"does not answer \(HTTP 503 .* reads its database\): waiting up to 30 s for it")
    make(stack.project, "stack-up")
    returncode, output = _finish(process, log)
    assert returncode == 0, output
    client = stack.client()
    assert_complete(client, client.get_run(run_id), epochs=3)


def test_object_store_down_when_the_model_is_logged_then_the_rerun_logs_it(stack, faulty, tmp_path):
    """Training needs only the server's database; the evaluate stage, which logs the model, fails
    with a message naming the problem, and `dvc repro` after the store is back reruns evaluate
    alone (nothing retrained) and logs the model in a new evaluation run. One client retry, not the
    stages' 2, keeps it short."""
    log = tmp_path / "repro.log"
    impatient = stack.environment(MLFLOW_HTTP_REQUEST_MAX_RETRIES="1", MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="1")
    process = _start_repro(faulty, impatient, log)
    run_id = _wait_for_epoch_logged(stack, faulty, process, log, epoch=1)
    stack.crash("seaweedfs")
    returncode, output = _finish(process, log)
    assert returncode != 0, output
    assert re.search(
        r"ERROR alexnet8: MLflow at http://127.0.0.1:\d+ did not take this stage's results \(.*\): "
        r"rerun the stage \(`dvc repro`\) once it answers",
        output,
    ), output
    assert "Traceback" not in output, output
    assert (faulty / "models/model.keras").is_file()  # trained and saved
    client = stack.client()
    assert client.get_run(run_id).info.status == "FINISHED"  # the training is complete
    assert evaluation_run(client, run_id).info.status == "FAILED"

    make(stack.project, "stack-up")
    rerun = run(["dvc", "repro"], faulty, stack.environment())
    assert "Running stage 'train'" not in rerun and "Running stage 'evaluate'" in rerun, rerun
    assert json.loads((faulty / "models/mlflow_run.json").read_text())["run_id"] == run_id
    assert_complete(client, client.get_run(run_id), epochs=3)


# Load -------------------------------------------------------------------------------------------------

CLIENTS = 8
LOAD_EPOCHS = 5
LOAD_METRICS = 16

LOAD_CLIENT = (
    textwrap.dedent(
        """
    import json, sys, time
    import mlflow
    import numpy as np

    class Mean(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):
            return np.asarray(model_input).mean(axis=1)

    index = int(sys.argv[1])
    started = time.time()
    # Created first, then set, as alexnet8.tracking does: mlflow.set_experiment alone, losing the race
    # to create it, returns without setting it, and the run lands in the Default experiment.
    try:
        mlflow.create_experiment("load")
    except mlflow.exceptions.MlflowException:
        pass
    mlflow.set_experiment("load")
    with mlflow.start_run(run_name=f"client-{index}") as run:
        mlflow.log_params({f"param_{k}": k * index for k in range(20)})
        for epoch in range(LOAD_EPOCHS):
            metrics = {f"metric_{k}": epoch + k / 100 for k in range(LOAD_METRICS)}
            mlflow.log_metrics(metrics, step=epoch, synchronous=True)
        mlflow.pyfunc.log_model(name="model", python_model=Mean(), pip_requirements=["numpy"])
    print(json.dumps({"run_id": run.info.run_id, "started": started, "ended": time.time()}))
    """
    )
    .replace("LOAD_EPOCHS", str(LOAD_EPOCHS))
    .replace("LOAD_METRICS", str(LOAD_METRICS))
)


def test_eight_clients_at_once_lose_nothing(stack, tmp_path):
    script = tmp_path / "client.py"
    script.write_text(LOAD_CLIENT)
    environment = stack.environment()
    started = time.monotonic()
    clients = [
        subprocess.Popen(
            ["python", str(script), str(index)],
            cwd=tmp_path,
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for index in range(CLIENTS)
    ]
    outputs = [client.communicate(timeout=600) for client in clients]
    elapsed = time.monotonic() - started
    assert all(client.returncode == 0 for client in clients), outputs
    reports = [json.loads(stdout.strip().splitlines()[-1]) for stdout, _ in outputs]
    logging = max(report["ended"] for report in reports) - min(report["started"] for report in reports)
    print(
        f"{CLIENTS} clients at once, each a run of {LOAD_EPOCHS} epochs x {LOAD_METRICS} metrics, 20 params and a "
        f"model: {elapsed:.1f} s from their start to the last one's end, {logging:.1f} s of it logging (after imports)"
    )
    client = stack.client()
    run_ids = {report["run_id"] for report in reports}
    assert len(run_ids) == CLIENTS
    experiment = client.get_experiment_by_name("load")
    for run_id in run_ids:
        run_ = client.get_run(run_id)
        assert run_.info.status == "FINISHED" and len(run_.data.params) == 20
        assert len(run_.data.metrics) == LOAD_METRICS
        for metric in ("metric_0", f"metric_{LOAD_METRICS - 1}"):
            assert [point.step for point in client.get_metric_history(run_id, metric)] == list(range(LOAD_EPOCHS))
        [model] = client.search_logged_models([experiment.experiment_id], f"source_run_id = '{run_id}'")
        assert any(
            key.endswith("MLmodel") for key in stack.keys(f"mlflow/{experiment.experiment_id}/models/{model.model_id}/")
        )


# Down, and up again ---------------------------------------------------------------------------------


def test_stack_down_leaves_nothing_running_and_up_finds_the_state_again(stack, repro):
    password = client_settings(stack.project)["MLFLOW_TRACKING_PASSWORD"]
    processes = stack.processes()
    assert len(processes) > 3
    make(stack.project, "stack-down")
    assert stack_script.alive(processes) == []
    assert not list(stack.folder.glob("*.pid"))
    status = subprocess.run(
        ["make", "-o", ".venv/.installed", "stack-status"],
        cwd=stack.project,
        env=minimal_environment(),
        capture_output=True,
        text=True,
    )
    assert status.returncode != 0 and "mlflow    not running" in status.stdout + status.stderr
    make(stack.project, "stack-up")
    assert client_settings(stack.project)["MLFLOW_TRACKING_PASSWORD"] == password
    assert stack.client().get_run(repro).info.status == "FINISHED"  # the database kept it
    assert stack.client().list_artifacts(repro, "provenance")  # and the object store its artifacts
    processes = stack.processes()
    make(stack.project, "stack-down")
    assert stack_script.alive(processes) == []
    make(stack.project, "stack-up")  # as the test found it, for any test after this one
