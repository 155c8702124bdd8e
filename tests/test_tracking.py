"""Where runs go: the project's own store, also from DVC's temporary experiment workspaces, and
after the project was copied or moved; what a tracking server that does not answer costs and says."""

import http.server
import shutil
import socket
import threading
from pathlib import Path

import mlflow
import pytest
from helpers import committed_repository
from mlflow.exceptions import MlflowException

from alexnet8 import local_store, tracking
from alexnet8.errors import PipelineError


def test_runs_from_a_dvc_temporary_workspace_land_in_the_projects_store(tmp_path, monkeypatch):
    workspace = tmp_path / ".dvc" / "tmp" / "exps" / "tmpabc123"
    workspace.mkdir(parents=True)
    monkeypatch.chdir(workspace)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with tracking.start_pipeline_run("queued", "exp-1", workspace / "run.json"):
        mlflow.log_text("hello", "note.txt")
    assert (tmp_path / "mlflow.db").exists() and not (workspace / "mlflow.db").exists()
    experiment = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_experiment_by_name("queued")
    assert experiment.artifact_location == (tmp_path / "mlruns").as_uri()
    assert list((tmp_path / "mlruns").rglob("note.txt")) and not (workspace / "mlruns").exists()


def test_runs_started_in_a_project_land_in_its_own_store(tmp_path, monkeypatch):
    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.chdir(project)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with tracking.start_pipeline_run("local", "run-1", project / "run.json") as record:
        mlflow.log_text("hello", "note.txt")
    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    assert client.get_run(record.run_id).info.status == "FINISHED"
    assert client.get_experiment_by_name("local").artifact_location == (project / "mlruns").as_uri()


def _run_logging_an_artifact(project, monkeypatch, name):
    """A stage's run in `project`, as a new process would start it: no MLFLOW_TRACKING_URI yet."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(project)
    with tracking.start_pipeline_run("local", name, project / f"{name}.json") as record:
        mlflow.log_text(name, f"{name}.txt")
    return record.run_id


def _files(folder):
    return sorted(path.relative_to(folder) for path in folder.rglob("*") if path.is_file())


@pytest.mark.parametrize("how", ["copied", "moved"])
def test_a_copied_or_moved_project_writes_only_inside_itself_and_keeps_its_runs(tmp_path, monkeypatch, how):
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    original = tmp_path / "project"
    original.mkdir()
    first = _run_logging_an_artifact(original, monkeypatch, "first")
    elsewhere = tmp_path / "project2"
    (shutil.copytree if how == "copied" else shutil.move)(original, elsewhere)
    before = _files(original) if how == "copied" else None

    second = _run_logging_an_artifact(elsewhere, monkeypatch, "second")
    if how == "copied":
        assert _files(original) == before  # nothing written into the original
    else:
        assert not original.exists()  # the old folder is not recreated
    client = mlflow.MlflowClient(local_store.store_uri(elsewhere))
    for run_id, name in ((first, "first"), (second, "second")):
        assert client.get_run(run_id).info.artifact_uri.startswith((elsewhere / "mlruns").as_uri())
        downloaded = client.download_artifacts(run_id, f"{name}.txt", str(tmp_path))
        assert Path(downloaded).read_text() == name  # the old run stays browsable
    assert local_store.keep_inside(elsewhere) == 0  # done once


def test_only_paths_under_the_old_project_root_are_rewritten(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    project = tmp_path / "project"
    project.mkdir()
    _run_logging_an_artifact(project, monkeypatch, "first")
    # An experiment whose artifacts were put, by hand, in a sibling whose name extends the project's.
    sibling = (tmp_path / "project-2" / "mlruns").as_uri()
    mlflow.MlflowClient(local_store.store_uri(project)).create_experiment("elsewhere", artifact_location=sibling)
    shutil.move(project, tmp_path / "moved")
    assert local_store.keep_inside(tmp_path / "moved") > 0
    client = mlflow.MlflowClient(local_store.store_uri(tmp_path / "moved"))
    assert client.get_experiment_by_name("elsewhere").artifact_location == sibling
    assert client.get_experiment_by_name("local").artifact_location == (tmp_path / "moved" / "mlruns").as_uri()


def test_an_mlflow_error_in_a_later_stage_says_to_rerun_it_and_ends_the_run_failed(tmp_path, monkeypatch):
    project = tmp_path / "project"
    project.mkdir()
    run_id = _run_logging_an_artifact(project, monkeypatch, "train")
    with pytest.raises(PipelineError) as error, tracking.reopen_pipeline_run(project / "train.json"):
        # What the client raises when the server's artifact store refuses a file.
        raise MlflowException("API request failed: 503 Service Unavailable")
    assert "did not take this stage's results (API request failed: 503 Service Unavailable)" in str(error.value)
    assert f"rerun the stage (`dvc repro`) once it answers, to log them into run {run_id}" in str(error.value)
    assert mlflow.MlflowClient().get_run(run_id).info.status == "FAILED"


class _ServerWithoutDatabase:
    """An MLflow server on 127.0.0.1 whose database is down for its first `failures` API requests:
    /health answers 200 all along, the API 503 (as MLflow does when PostgreSQL does not answer)."""

    def __init__(self, failures: int):
        self.failures = failures
        self.authorizations = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path != "/health":
                    server.authorizations.append(self.headers.get("Authorization"))
                    if server.failures > 0:
                        server.failures -= 1
                        self.send_error(503, "Service Unavailable")
                        return
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.uri = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server_without_database():
    servers = []
    yield lambda failures: servers.append(_ServerWithoutDatabase(failures)) or servers[-1]
    for server in servers:
        server.close()


def test_a_server_whose_database_is_down_is_waited_for_like_a_server_that_is_down(
    server_without_database, monkeypatch, caplog
):
    server = server_without_database(failures=2)  # two probes, a second apart
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "secret")
    with caplog.at_level("INFO", logger="alexnet8.tracking"):
        assert tracking.wait_for_tracking_server(seconds=30) is None
    assert (
        f"MLflow at {server.uri} does not answer (HTTP 503 (Service Unavailable) to a request that reads its "
        "database): waiting up to 30 s for it" in caplog.text
    )
    assert f"MLflow at {server.uri} answers again" in caplog.text
    assert set(server.authorizations) == {"Basic YWRtaW46c2VjcmV0"}  # the client's credentials: admin:secret


def test_a_server_whose_database_stays_down_fails_the_check_before_training(server_without_database, monkeypatch):
    server = server_without_database(failures=1000)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    with pytest.raises(PipelineError) as error:
        tracking.check_tracking_server()
    assert str(error.value).startswith(
        f"the MLflow tracking server at {server.uri} (MLFLOW_TRACKING_URI) does not answer: HTTP 503 "
        "(Service Unavailable) to a request that reads its database"
    )
    assert tracking.wait_for_tracking_server(seconds=1) == (
        "HTTP 503 (Service Unavailable) to a request that reads its database"
    )


def _nothing_listens() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}"


@pytest.mark.parametrize("stop", [KeyboardInterrupt, PipelineError], ids=["Ctrl-C", "the stage's error"])
def test_a_run_ended_while_the_server_is_gone_says_why_its_status_was_not_taken(tmp_path, monkeypatch, caplog, stop):
    for name, value in tracking.HTTP_REQUEST_BOUNDS.items():
        monkeypatch.setenv(name, value)  # as the stage sets them (restored after the test)
    with pytest.raises(stop), tracking.start_pipeline_run("local", "run", tmp_path / "run.json") as record:
        mlflow.set_tracking_uri(_nothing_listens())  # the server died during the stage
        raise stop("the stage's own message")
    status = "KILLED" if stop is KeyboardInterrupt else "FAILED"
    assert (
        f"did not take run {record.run_id}'s status {status} (ConnectionRefusedError: [Errno 111] Connection "
        "refused): it shows RUNNING until a rerun ends it" in caplog.text
    )


def test_a_tree_with_uncommitted_changes_gives_their_diff_and_the_untracked_names(tmp_path, monkeypatch):
    repository = committed_repository(tmp_path / "repository", {"model.py": "units = 16\n"})
    monkeypatch.chdir(repository)
    assert tracking.uncommitted_changes() == (b"", "")
    (repository / "model.py").write_bytes(b"units = 32\r\n")  # a file's own line endings are kept
    (repository / "notes.txt").write_text("not in git\n")
    diff, untracked = tracking.uncommitted_changes()
    assert b"diff --git a/model.py b/model.py" in diff and b"+units = 32\r\n" in diff
    assert untracked == "notes.txt\n"
