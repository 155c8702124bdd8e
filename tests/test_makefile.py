"""The Makefile's targets that need no environment: `make clean` removes what the next
`make pipeline` makes again and keeps the rest (README, "Clean up")."""

from __future__ import annotations

import shutil
import subprocess

from helpers import PROJECT_ROOT, minimal_environment

REMADE = [
    "data/prepared/train_images.npy",
    "models/model.keras",
    "models/mlflow_run.json",
    "models/served_model.json",
    "reports/train_metrics.json",
    "reports/figures/confusion_matrix.png",
    "checkpoints/0123abcd/training_metadata.json",
    "dvc_plots/index.html",
]
KEPT = [
    ".venv/bin/python",
    "data/raw/cifar-10-binary.tar.gz",
    "data/raw/.gitignore",
    "models/.gitignore",
    "mlflow.db",
    "mlruns/1/meta.yaml",
    ".dvc/cache/files/md5/00/abc",
    ".stack/env",
    "params.yaml",
    "dvc.lock",
]


def test_make_clean_removes_what_a_run_makes_again_and_keeps_the_rest(tmp_path):
    shutil.copy(PROJECT_ROOT / "Makefile", tmp_path / "Makefile")
    for relative in REMADE + KEPT:
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text("x")
    result = subprocess.run(["make", "clean"], cwd=tmp_path, env=minimal_environment(), capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert [relative for relative in REMADE if (tmp_path / relative).exists()] == []
    assert [relative for relative in KEPT if not (tmp_path / relative).exists()] == []
    assert not (tmp_path / "reports").exists() and not (tmp_path / "checkpoints").exists()
    # Twice in a row: nothing left to remove is no error.
    again = subprocess.run(["make", "clean"], cwd=tmp_path, env=minimal_environment(), capture_output=True, text=True)
    assert again.returncode == 0, again.stdout + again.stderr
