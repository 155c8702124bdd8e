"""Shared fixtures: tiny CIFAR-format archives, prepared data and a throwaway MLflow store."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from cifar_archive import make_cifar_archive
from helpers import PROJECT_ROOT

from alexnet8.params import load_params


@pytest.fixture(autouse=True)
def _isolated_mlflow(tmp_path, monkeypatch):
    """Every test logs to its own SQLite store, never to the project's mlflow.db or mlruns/."""
    import mlflow

    # A new SQLite store puts artifacts in ./mlruns: run in the test's folder, not the project's.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)  # mlflow.set_experiment sets it
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    yield
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


@pytest.fixture
def default_params():
    return load_params(PROJECT_ROOT / "params.yaml")


@pytest.fixture(scope="session")
def tiny_archive(tmp_path_factory) -> tuple[Path, str]:
    """A valid CIFAR-10 binary archive with 100 training and 40 test images; (path, md5)."""
    path = tmp_path_factory.mktemp("archive") / "cifar-10-binary.tar.gz"
    return path, make_cifar_archive(path, per_batch=20, test_count=40)


@pytest.fixture(scope="session")
def prepared_dir(tiny_archive, tmp_path_factory) -> Path:
    """The tiny archive after the preprocess stage at the default params."""
    from alexnet8.preprocess import preprocess

    params = load_params(PROJECT_ROOT / "params.yaml")
    out = tmp_path_factory.mktemp("prepared") / "prepared"
    preprocess(tiny_archive[0], out, params.preprocess, params.seed)
    return out


@pytest.fixture
def small_disk(tmp_path):
    """A function that mounts a tmpfs of the given size (`"256k"`) on a new folder and returns it:
    a disk that fills up for real. Mounting needs root (CI runs as root); the test is skipped,
    saying why, where it is not allowed."""
    mounted = []

    def mount(size: str) -> Path:
        folder = tmp_path / f"disk{len(mounted)}"
        folder.mkdir()
        command = ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(folder)]
        try:
            result = subprocess.run(command, capture_output=True, text=True)
        except FileNotFoundError:
            pytest.skip("no `mount` command: a full disk is tested on a small tmpfs")
        if result.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs for a full disk (needs root): {result.stderr.strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "--lazy", str(folder)], check=False)
