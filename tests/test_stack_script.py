"""stack/stack.py's parts that need no server: its settings, secrets and messages."""

from __future__ import annotations

import socket
import stat
import subprocess
import sys

import pytest
from helpers import load_script

stack_script = load_script("stack/stack.py")


def test_settings_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("STACK_MLFLOW_PORT", "6000")
    monkeypatch.setenv("STACK_BUCKET", "team")
    settings = stack_script.Settings.from_environment()
    assert (settings.mlflow_port, settings.bucket, settings.host) == (6000, "team", "127.0.0.1")
    assert settings.tracking_uri == "http://127.0.0.1:6000"
    assert settings.allowed_hosts == "127.0.0.1:6000,localhost:6000"
    assert settings.artifacts_destination == "s3://team/mlflow" and settings.dvc_remote_url == "s3://team/dvc"


def test_the_mlflow_server_gets_a_worker_per_core_within_bounds():
    assert [stack_script.mlflow_workers(cpus) for cpus in (1, 2, 3, 64)] == [2, 2, 3, 4]
    command = stack_script.mlflow_server_arguments(stack_script.Settings(), "postgresql://db", workers=3)
    assert command[command.index("--workers") + 1] == "3"


def test_every_generated_secret_is_new_and_safe_anywhere():
    first, second = stack_script.Secrets.generate(), stack_script.Secrets.generate()
    assert first != second
    for value in [*vars(first).values(), *first.seaweedfs_jwt_keys]:
        if isinstance(value, str):
            assert len(value) >= 18 and value.isalnum(), value  # no '-' that a command line takes for an option


def test_secret_files_are_private_from_the_first_byte(tmp_path):
    path = tmp_path / "secret"
    stack_script.write_private(path, "x\n")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.read_text() == "x\n"


def test_a_stale_temporary_file_does_not_expose_a_secret(tmp_path):
    stale = tmp_path / ".secret.tmp"
    stale.write_text("left by a crash")
    stale.chmod(0o644)
    stack_script.write_private(tmp_path / "secret", "x\n")
    assert stat.S_IMODE((tmp_path / "secret").stat().st_mode) == 0o600 and not stale.exists()


def test_the_dvc_remotes_keys_go_into_a_private_config_local_even_if_it_was_not(tmp_path):
    """`make setup` may have made .dvc/config.local with the umask's mode (0644) already."""
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    config = tmp_path / ".dvc/config.local"
    config.write_text("[plots]\n    html_template = plots/template.html\n")
    config.chmod(0o644)
    state = stack_script.StackState(tmp_path / ".stack", stack_script.Settings(), stack_script.Secrets.generate())
    stack_script.ClientSetup(state).add_dvc_remote(tmp_path)
    text = config.read_text()
    assert state.secrets.s3_secret_key in text and "html_template = plots/template.html" in text
    assert stat.S_IMODE(config.stat().st_mode) == 0o600


def test_a_server_that_exits_is_named_with_its_log(tmp_path):
    supervisor = stack_script.ProcessSupervisor(tmp_path)
    (tmp_path / "mlflow.log").write_text("starting\nError: the database is not there\n")
    process = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    with pytest.raises(stack_script.StackError) as failed:
        supervisor.wait_until_up("mlflow", process, check=lambda: 1 / 0)  # it never answers
    message = str(failed.value)
    assert message.startswith(f"mlflow did not come up: it exited with status 3. Its log: {tmp_path / 'mlflow.log'}")
    assert "Error: the database is not there" in message


def test_a_taken_port_is_named_with_the_setting_to_change():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(stack_script.StackError, match=f"postgres cannot start: port {port} on 127.0.0.1 is taken"):
            stack_script.ensure_free("postgres", "127.0.0.1", port, "STACK_POSTGRES_PORT")


def test_status_without_a_stack_says_so(tmp_path, caplog):
    caplog.set_level("INFO")
    assert stack_script.Stack(tmp_path).status() is False
    assert "no stack in" in caplog.text
