"""dvc.yaml states, for each stage, exactly the source files it imports: editing one reruns what uses it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml
from helpers import PROJECT_ROOT

PACKAGE = PROJECT_ROOT / "src" / "alexnet8"
STAGES = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())["stages"]


def _imports(module: Path) -> set[str]:
    """Package modules that `module` imports, directly or through other package modules."""
    seen: set[str] = {"__init__.py", module.name}
    pending = [module]
    while pending:
        tree = ast.parse(pending.pop().read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("alexnet8"):
                names = [node.module.split(".", 1)[1]] if "." in node.module else [alias.name for alias in node.names]
            elif isinstance(node, ast.Import):
                names = [alias.name.split(".", 1)[1] for alias in node.names if alias.name.startswith("alexnet8.")]
            for name in names:
                if f"{name}.py" not in seen and (PACKAGE / f"{name}.py").exists():
                    seen.add(f"{name}.py")
                    pending.append(PACKAGE / f"{name}.py")
    return seen


@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_code_deps_are_exactly_its_imports(stage):
    declared = {Path(dep).name for dep in STAGES[stage]["deps"] if str(dep).startswith("src/")}
    # The command is `python -m alexnet8 <stage>`: __main__.py runs first, then the stage's module.
    assert STAGES[stage]["cmd"].startswith(f"python -m alexnet8 {stage} ")
    assert declared == _imports(PACKAGE / "__main__.py") | _imports(PACKAGE / f"{stage}.py")


@pytest.mark.parametrize("stage", [name for name in STAGES if "tracking.py" in _imports(PACKAGE / f"{name}.py")])
def test_stages_that_log_to_mlflow_are_never_restored_from_the_run_cache(stage):
    """DVC's run cache restores a stage's outputs without running it, and then nothing is logged;
    an uncached plain output turns the run cache off for the stage (metrics and plots do not)."""
    outs = STAGES[stage].get("outs", [])
    assert any(isinstance(out, dict) and next(iter(out.values())).get("cache") is False for out in outs), stage
