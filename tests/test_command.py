"""`python -m alexnet8 <stage>`, as dvc.yaml runs the stages: a bad params file is reported, naming
the file and the key, before TensorFlow or MLflow is imported (in a fraction of a second, not
after TensorFlow's import), with exit status 1 and nothing written; `--help` is as fast."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import PROJECT_ROOT, write_params

from alexnet8 import cli

PARAMS_STAGES = [name for name, stage in cli.STAGES.items() if stage.reads_params]
HEAVY = ("tensorflow", "keras", "mlflow", "matplotlib")

# Runs the command's main as `python -m alexnet8` does, then says which heavy modules it imported.
PROBE = f"""
import sys
from alexnet8.__main__ import main
try:
    main(sys.argv[1:])
except SystemExit as stop:
    code = stop.code
print("heavy modules imported:", sorted(name for name in {HEAVY!r} if name in sys.modules), file=sys.stderr)
sys.exit(code)
"""


def _environment() -> dict[str, str]:
    # This checkout's code, whatever the environment has installed.
    return os.environ | {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT / "src"), os.environ.get("PYTHONPATH")]))
    }


def _stage_arguments(stage: str, folder: Path) -> list[str]:
    """The stage's options, each naming a path in `folder` that does not exist."""
    return [argument for option in cli.STAGES[stage].options for argument in (option, str(folder / option.strip("-")))]


def _run(command: list[str], folder: Path) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    result = subprocess.run(command, cwd=folder, env=_environment(), capture_output=True, text=True, timeout=120)
    return result, time.monotonic() - started


def _bad_params(kind: str, path: Path) -> tuple[Path, str]:
    """A params file with a YAML error or an invalid value; and what the error must say."""
    if kind == "YAML error":
        text = (PROJECT_ROOT / "params.yaml").read_text()
        path.write_text(text.replace("seed:", "seed: [", 1))
        return path, f"{path}: not valid YAML"
    write_params(path, **{"train.epochs": 0})
    return path, f"{path}: invalid params:\n  train.epochs: Input should be greater than 0 (got 0)"


@pytest.mark.parametrize("kind", ["YAML error", "invalid value"])
@pytest.mark.parametrize("stage", PARAMS_STAGES)
def test_bad_params_are_reported_before_the_heavy_imports_and_nothing_is_written(stage, kind, tmp_path):
    params, message = _bad_params(kind, tmp_path / "params.yaml")
    arguments = [stage, "--params", str(params), *_stage_arguments(stage, tmp_path)]

    result, _ = _run([sys.executable, "-m", "alexnet8", *arguments], tmp_path)
    assert result.returncode == 1, result.stderr
    assert f"ERROR alexnet8: {message}" in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["params.yaml"]  # nothing written

    probed, _ = _run([sys.executable, "-c", PROBE, *arguments], tmp_path)
    assert probed.returncode == 1 and "heavy modules imported: []" in probed.stderr, probed.stderr


@pytest.mark.parametrize("stage", list(cli.STAGES))
def test_help_imports_nothing_heavy(stage, tmp_path):
    result, _ = _run([sys.executable, "-c", PROBE, stage, "--help"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"usage: python -m alexnet8 {stage}" in result.stdout
    assert all(option in result.stdout for option in cli.STAGES[stage].options)
    assert "heavy modules imported: []" in result.stderr


def test_a_missing_option_is_a_usage_error_before_any_import(tmp_path):
    result, _ = _run([sys.executable, "-c", PROBE, "train", "--data", "x"], tmp_path)
    assert result.returncode == 2
    assert "the following arguments are required: --model" in result.stderr
    assert "heavy modules imported: []" in result.stderr


def test_a_good_params_file_runs_the_stage(tiny_archive, tmp_path):
    archive, md5 = tiny_archive
    params = write_params(tmp_path / "params.yaml", **{"fetch.url": str(archive), "fetch.md5": md5})
    result, _ = _run(
        [sys.executable, "-m", "alexnet8", "fetch", "--params", str(params), "--out", str(tmp_path / "a.tar.gz")],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "a.tar.gz").read_bytes() == archive.read_bytes()
