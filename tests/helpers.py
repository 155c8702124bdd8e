"""What the tests share besides fixtures: the project's location, params overrides, and the
environments in which the tests run the README's commands.

pytest puts this folder on `sys.path` (rootdir-relative imports, no package), so test modules
import it as `helpers`.
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import mlflow
import yaml

from alexnet8.params import with_overrides

PROJECT_ROOT = Path(__file__).resolve().parents[1]

# A shell in which nothing of the project is active: the system's folders only.
SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin"


def minimal_environment(**extra: str) -> dict[str, str]:
    """The environment of a person's fresh login shell: the system PATH and their HOME, nothing
    of this test process (no virtualenv, no MLFLOW_* or DVC variables, no PYTHONPATH)."""
    return {"PATH": SYSTEM_PATH, "HOME": os.environ.get("HOME", "/root"), "LANG": "C.UTF-8", **extra}


def activated_environment(project: Path | None = None, **extra: str) -> dict[str, str]:
    """`minimal_environment` after `source .venv/bin/activate` in `project`, as the README tells
    users to do before running `dvc` and `mlflow` themselves (only for those). Without `project`,
    the environment running the tests (this checkout's `.venv` under `make test`)."""
    environment = str(project / ".venv") if project else sys.prefix
    assert Path(environment, "bin", "activate").exists(), f"{environment}: no environment (link_test_environment)"
    return minimal_environment(VIRTUAL_ENV=environment, **extra) | {"PATH": f"{environment}/bin:{SYSTEM_PATH}"}


def run_command(command: list[str], cwd: Path, environment: dict[str, str] | None = None, timeout: float = 1800) -> str:
    """Run a command as a user would type it (default: in the activated environment); its output,
    or an AssertionError with all of it."""
    result = subprocess.run(
        command, cwd=cwd, env=environment or activated_environment(), capture_output=True, text=True, timeout=timeout
    )
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result.stdout + result.stderr


def set_params(path: Path, overrides: dict[str, object], base: Path | None = None) -> Path:
    """Write `base` (default: `path` itself) to `path` with dotted keys set, unknown ones included
    (tests of validation need them): set_params(p, {"train.epochs": 2})."""
    raw = with_overrides(yaml.safe_load((base or path).read_text()), overrides)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def write_params(path: Path, base: Path = PROJECT_ROOT / "params.yaml", **overrides: object) -> Path:
    """Copy params.yaml to `path`, setting dotted keys: write_params(p, **{"train.epochs": 2})."""
    return set_params(path, overrides, base=base)


def saved_model_config(path: Path) -> tuple[str, set[str]]:
    """A `.keras` file's config.json, and the top-level packages of the classes it names (all
    "keras" when loading it needs nothing of this package)."""
    with zipfile.ZipFile(path) as archive:
        config = archive.read("config.json").decode()
    return config, {module.split(".")[0] for module in re.findall(r'"module": "([^"]+)"', config)}


def load_script(relative_path: str):
    """Import one of the project's scripts (bench/, docs/) as a module, for its functions."""
    path = PROJECT_ROOT / relative_path
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def commit_all(folder: Path, message: str, allow_empty: bool = False) -> None:
    """`git add -A && git commit` in `folder`, as a person with a configured identity would."""
    identity = ["-c", "user.name=test", "-c", "user.email=test@example.invalid"]
    run_command(["git", "add", "-A"], folder, minimal_environment())
    empty = ["--allow-empty"] if allow_empty else []
    run_command(["git", *identity, "commit", "-qm", message, *empty], folder, minimal_environment())


def committed_repository(folder: Path, files: dict[str, str]) -> Path:
    """A new git repository at `folder` whose one commit holds `files` (relative path -> text)."""
    folder.mkdir(parents=True)
    for relative, text in files.items():
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_text(text)
    run_command(["git", "init", "-q"], folder, minimal_environment())
    commit_all(folder, "first")
    return folder


def fresh_clone(destination: Path) -> Path:
    """A new git repository at `destination` holding the project as a clone of it would: the
    files git tracks or would track (untracked, not ignored), as they are in the working tree,
    so uncommitted work is tested too; nothing ignored (.venv, mlflow.db, data) comes along."""
    listed = (
        subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=PROJECT_ROOT,
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for relative in filter(None, listed):
        source = PROJECT_ROOT / relative
        if source.is_file():  # a tracked file deleted in the working tree is not cloned
            (destination / relative).parent.mkdir(parents=True, exist_ok=True)
            destination.joinpath(relative).write_bytes(source.read_bytes())
            destination.joinpath(relative).chmod(source.stat().st_mode)
    run_command(["git", "init", "-q"], destination, minimal_environment())
    commit_all(destination, "clone")
    return destination


# `make` typed in a project whose `.venv` is this test's environment (link_test_environment), told
# that the environment and its Ray extra are installed (they are), so that it installs nothing.
MAKE = ["make", "-o", ".venv/.installed", "-o", ".venv/.installed-ray"]


def make(project: Path, *arguments: str, timeout: float = 1800, **settings: str) -> str:
    """`make ARGUMENTS` typed in `project` from a plain shell (with `settings` exported), the
    project's `.venv` being this test's environment (link_test_environment)."""
    return run_command([*MAKE, *arguments], project, minimal_environment(**settings), timeout=timeout)


def link_test_environment(project: Path) -> None:
    """Make this test's environment the project's `.venv`: a link git does not see (see MAKE)."""
    with open(project / ".git" / "info" / "exclude", "a") as exclude:
        exclude.write("/.venv\n")  # `.gitignore`'s `.venv/` matches only a folder, not the link
    (project / ".venv").symlink_to(sys.prefix, target_is_directory=True)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class TrackingServer:
    """`mlflow server` on 127.0.0.1:`port` with its store in `folder`; started again on the same
    port and store after a crash."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        command = [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", f"sqlite:///{self.folder / 'store.db'}",
            "--artifacts-destination", str(self.folder / "artifacts"),
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
        ]  # fmt: skip
        with open(self.folder / "server.log", "a") as log:
            self.process = subprocess.Popen(
                command,
                env=activated_environment(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: uvicorn runs in a child process
            )
        deadline = time.monotonic() + 180
        while True:
            assert self.process.poll() is None, (self.folder / "server.log").read_text()
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=2).close()
                return
            except (urllib.error.URLError, OSError):
                assert time.monotonic() < deadline, (self.folder / "server.log").read_text()
                time.sleep(0.25)

    def kill(self) -> None:
        """SIGKILL the server and every process of its group."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process = None

    def client(self) -> mlflow.MlflowClient:
        return mlflow.MlflowClient(tracking_uri=self.uri)


def evaluation_run(client: mlflow.MlflowClient, training_run_id: str) -> mlflow.entities.Run:
    """The newest evaluation of a training run: the run the evaluate stage nests under it."""
    experiment_id = client.get_run(training_run_id).info.experiment_id
    runs = client.search_runs(
        [experiment_id], f"tags.mlflow.parentRunId = '{training_run_id}'", order_by=["attributes.start_time DESC"]
    )
    assert runs, f"no evaluation run under {training_run_id}"
    return runs[0]
