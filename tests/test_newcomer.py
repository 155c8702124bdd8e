"""The README's first command, typed literally in a fresh clone from a shell where nothing of the
project is active: the system PATH, a HOME, nothing else of this test process."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import mlflow
import pytest
from cifar_archive import make_cifar_archive
from helpers import SYSTEM_PATH, evaluation_run, fresh_clone, minimal_environment, set_params

pytestmark = pytest.mark.slow

OUTPUTS = [
    "data/raw/cifar-10-binary.tar.gz",
    "data/prepared/dataset.json",
    "models/model.keras",
    "models/mlflow_run.json",
    "reports/train_metrics.json",
    "reports/test_metrics.json",
    "reports/figures/confusion_matrix.png",
]


def _make(arguments: list[str], clone: Path, environment: dict[str, str]) -> str:
    result = subprocess.run(
        ["make", *arguments], cwd=clone, env=environment, capture_output=True, text=True, timeout=1800
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"make {' '.join(arguments)} failed ({result.returncode}):\n{output}"
    return output


def _finished_run(clone: Path) -> mlflow.entities.Run:
    run_id = json.loads((clone / "models/mlflow_run.json").read_text())["run_id"]
    return mlflow.MlflowClient(f"sqlite:///{clone / 'mlflow.db'}").get_run(run_id)


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    return fresh_clone(tmp_path_factory.mktemp("newcomer"))


def test_make_pipeline_with_an_own_archive_runs_from_a_plain_shell(clone, tmp_path):
    archive = tmp_path / "cifar-10-binary.tar.gz"
    md5 = make_cifar_archive(archive, per_batch=20, test_count=40)
    output = _make(["pipeline", f"FETCH_URL={archive}", f"FETCH_MD5={md5}"], clone, minimal_environment())
    for stage in ("fetch", "preprocess", "train", "evaluate", "plot"):
        assert f"Running stage '{stage}'" in output
    assert all((clone / relative).is_file() for relative in OUTPUTS)
    run = _finished_run(clone)
    evaluation = evaluation_run(mlflow.MlflowClient(f"sqlite:///{clone / 'mlflow.db'}"), run.info.run_id)
    assert run.info.status == "FINISHED" and "test/accuracy" in evaluation.data.metrics
    assert run.data.tags["data.archive_md5"] == md5


def test_make_pipeline_runs_the_projects_python_when_another_is_first_on_path(clone, tmp_path):
    # Another `python` first on PATH, as with a system or conda Python: it must never run a stage.
    decoy = tmp_path / "bin"
    decoy.mkdir()
    called = tmp_path / "decoy-called"
    for name in ("python", "python3"):
        (decoy / name).write_text(f"#!/bin/sh\ntouch {called}\nexit 97\n")
        (decoy / name).chmod(0o755)
    archive = tmp_path / "other-cifar-10-binary.tar.gz"
    md5 = make_cifar_archive(archive, per_batch=20, test_count=40, seed=5)
    # The README's other way: point params.yaml at the archive and run plain `make pipeline` (`dvc repro`).
    set_params(clone / "params.yaml", {"fetch.url": str(archive), "fetch.md5": md5})
    output = _make(["pipeline", "PYTHON=/usr/bin/python3"], clone, minimal_environment(PATH=f"{decoy}:{SYSTEM_PATH}"))
    assert "Running stage 'train'" in output
    assert not called.exists(), "a stage ran the python found first on PATH, not the project's"
    assert _finished_run(clone).data.tags["data.archive_md5"] == md5
