"""`make reproduce`: a registered version rebuilt from its record alone, in a git worktree, and the
verdict; first the verdict itself on made-up records, then real pipeline runs in a fresh clone."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml
from helpers import (
    commit_all,
    committed_repository,
    fresh_clone,
    link_test_environment,
    make,
    minimal_environment,
    run_command,
    write_params,
)
from test_stack import stack  # noqa: F401  the team stack of a fresh clone, up on free ports (a fixture)

from alexnet8.errors import PipelineError
from alexnet8.reproduce import (
    BIT_FOR_BIT,
    DIFFERS,
    Outcome,
    Source,
    code_changes,
    judge,
    package_differences,
    parse_reference,
)

MACHINE = {
    "machine.cpu": "AMD EPYC",
    "machine.cpu_features": "avx avx2 fma sse4_2",
    "machine.threads": "2",
    "machine.gpus": "none",
}
PACKAGES = "keras==3.15.1\nnumpy==2.1.3\ntensorflow==2.21.0\n"
METRICS = {"train/accuracy": 0.5, "train/loss": 1.5, "test/accuracy": 0.48, "test/loss": 1.6}
PARAMS = {"train.epochs": "1", "derived.jit_compile": "True", "mlflow.registered_model_name": "alexnet8-cifar10"}


def _source(**changes) -> Source:
    fields = {
        "label": "alexnet8-cifar10 version 3",
        "training_run_id": "a" * 32,
        "evaluation_run_id": "b" * 32,
        "commit": "c" * 40,
        "dirty": False,
        "params": PARAMS,
        "metrics": METRICS,
        "tags": {**MACHINE, "data.prepared_md5": "d" * 32},
        "files": {"params.yaml": "seed: 42\n", "packages.txt": PACKAGES},
        "weights_digest": "e" * 64,
        "digest_origin": "the run's",
    }
    return Source(**(fields | changes))


def _outcome(**changes) -> Outcome:
    fields = {
        "training_run_id": "f" * 32,
        "evaluation_run_id": "0" * 32,
        "params": {**PARAMS, "mlflow.registered_model_name": ""},
        "metrics": METRICS,
        "prepared_md5": "d" * 32,
        "weights_digest": "e" * 64,
        "machine": MACHINE,
        "packages": PACKAGES,
        "unrestored": [],
    }
    return Outcome(**(fields | changes))


def test_same_weights_and_metrics_are_bit_for_bit():
    assert judge(_source(), _outcome()).headline == BIT_FOR_BIT


def test_another_cpu_kind_gives_a_reproduction_within_the_accuracy_gap():
    other = _outcome(
        machine={**MACHINE, "machine.cpu_features": "avx avx2 avx512f fma sse4_2"},
        weights_digest="1" * 64,
        metrics={**METRICS, "test/accuracy": 0.49},
    )
    verdict = judge(_source(), other)
    assert verdict.headline == "reproduced within 0.0100 (different CPU kind: expected)"
    assert "test/accuracy 0.49 here, 0.48 in the run" in verdict.details
    assert "machine.cpu_features: avx avx2 avx512f fma sse4_2 here, avx avx2 fma sse4_2 in the run" in verdict.details


def test_other_weights_on_the_same_machine_and_packages_differ():
    verdict = judge(_source(), _outcome(weights_digest="1" * 64))
    assert verdict.headline == DIFFERS
    assert any("bit-identical weights were expected" in detail for detail in verdict.details)


def test_other_packages_are_named_and_expected_to_change_the_weights():
    here = PACKAGES.replace("keras==3.15.1", "keras==3.16.0")
    assert package_differences(PACKAGES, here) == ["keras 3.16.0 here, 3.15.1 in the run"]
    verdict = judge(_source(), _outcome(packages=here, weights_digest="1" * 64))
    assert verdict.headline == "reproduced within 0.0000 (packages: expected)"


def test_other_prepared_data_differs_whatever_the_machine():
    verdict = judge(_source(), _outcome(prepared_md5="9" * 32, machine={**MACHINE, "machine.threads": "8"}))
    assert verdict.headline == DIFFERS
    assert f"prepared data md5 {'9' * 32} here, {'d' * 32} in the run" in verdict.details


def test_a_run_from_before_machine_facts_were_recorded_says_what_cannot_be_checked():
    verdict = judge(_source(tags={}, dirty=True), _outcome())
    assert verdict.headline == BIT_FOR_BIT
    assert any("did not record its machine" in detail for detail in verdict.details)
    assert any("uncommitted changes, not recorded" in detail for detail in verdict.details)


def test_only_code_changes_are_restored_from_a_diff_not_params_lock_or_outputs():
    diff = "".join(
        f"diff --git a/{name} b/{name}\n--- a/{name}\n+++ b/{name}\n"
        for name in (
            "params.yaml",
            "dvc.lock",
            "reports/train_history.csv",
            "data/prepared/x.npy",
            "src/alexnet8/network.py",
        )
    )
    lock = yaml.safe_dump(
        {
            "stages": {
                "preprocess": {"outs": [{"path": "data/prepared"}]},
                "train": {"outs": [{"path": "reports/train_history.csv"}]},
            }
        }
    )
    assert code_changes(diff, lock) == ["src/alexnet8/network.py"]


@pytest.mark.parametrize("reference", ["models:/alexnet8-cifar10", "champion", "12345", ""])
def test_a_reference_that_names_no_model_is_refused(reference):
    with pytest.raises(PipelineError, match="is not a model to reproduce"):
        parse_reference(reference)


# The real thing: pipeline runs in a fresh clone, reproduced in git worktrees beside it.

TINY = {"train.epochs": 1, "train.batch_size": 16, "train.dense_units": 16}


def _served_version(project: Path) -> str:
    return json.loads((project / "models" / "served_model.json").read_text())["version"]


def _checkout_state(project: Path) -> tuple[str, dict[str, str]]:
    """`git status` and every file's sha256, but for git's own folder and the MLflow store (which
    gets the reproduction's runs)."""
    status = run_command(["git", "status", "--porcelain", "--untracked-files=all"], project, minimal_environment())
    files = {}
    for path in sorted(project.rglob("*")):
        relative = path.relative_to(project).as_posix()
        if path.is_file() and not relative.startswith((".git/", "mlruns/", ".venv")) and relative != "mlflow.db":
            files[relative] = hashlib.sha256(path.read_bytes()).hexdigest()
    return status, files


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_archive) -> Path:
    """A clone of the project pointed at the tiny archive, committed, after `make pipeline`: version 1."""
    root = fresh_clone(tmp_path_factory.mktemp("reproduce") / "project")
    archive, md5 = tiny_archive
    write_params(root / "params.yaml", **{"fetch.url": archive.as_uri(), "fetch.md5": md5, **TINY})
    commit_all(root, "the project on the tiny archive")
    link_test_environment(root)
    make(root, "pipeline")
    commit_all(root, "its outputs")
    return root


pipeline = pytest.mark.slow


@pipeline
def test_make_reproduce_rebuilds_a_version_bit_for_bit_and_leaves_the_checkout_as_it_was(project):
    before = _checkout_state(project)
    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    versions = [str(found.version) for found in client.search_model_versions("name = 'alexnet8-cifar10'")]
    output = make(project, "reproduce", "MODEL=models:/alexnet8-cifar10/1")
    print(output)  # the command's output, for the docs (pytest -s)
    assert "alexnet8-cifar10 version 1: reproduced bit for bit" in output
    assert _checkout_state(project) == before

    version = client.get_model_version("alexnet8-cifar10", "1")
    assert version.tags["reproduction.verdict"] == BIT_FOR_BIT
    training = client.get_run(version.run_id).data.tags["mlflow.parentRunId"]
    reproduction = client.get_run(version.tags["reproduction.run_id"])
    assert reproduction.data.tags["reproduces"] == training
    assert reproduction.data.params["train.dense_units"] == "16"
    # The reproduction is not registered: the versions are those there were before.
    assert [str(found.version) for found in client.search_model_versions("name = 'alexnet8-cifar10'")] == versions
    workspace = project.parent / f"project-reproduce-{training[:8]}"
    assert (workspace / "models" / "model.keras").is_file()


@pipeline
def test_an_experiment_with_a_changed_param_is_reproduced_with_that_param(project, tmp_path):
    run_command(["dvc", "exp", "run", "-n", "lr-low", "-S", "train.learning_rate=0.0005"], project)
    version = _served_version(project)
    run_command(["git", "checkout", "--", "."], project)  # `exp run` leaves its params and outputs
    run_command(["dvc", "checkout"], project)

    output = make(project, "reproduce", f"MODEL=models:/alexnet8-cifar10/{version}", f"WORKSPACE={tmp_path / 'lr'}")
    assert f"alexnet8-cifar10 version {version}: reproduced bit for bit" in output
    assert yaml.safe_load((tmp_path / "lr" / "params.yaml").read_text())["train"]["learning_rate"] == 0.0005


@pipeline
def test_a_run_from_a_dirty_tree_restores_its_changes_and_names_what_it_cannot(project, tmp_path):
    with open(project / "src" / "alexnet8" / "train.py", "a") as code:
        code.write("# an uncommitted change\n")
    (project / "notes.txt").write_text("a file git does not track\n")
    run_command(["dvc", "repro"], project)
    version = _served_version(project)

    output = make(project, "reproduce", f"MODEL=models:/alexnet8-cifar10/{version}", f"WORKSPACE={tmp_path / 'dirty'}")
    assert "restored the run's uncommitted changes to src/alexnet8/train.py" in output
    assert "not restored (files git did not track in the run's checkout): notes.txt" in output
    assert (tmp_path / "dirty" / "src" / "alexnet8" / "train.py").read_text().endswith("# an uncommitted change\n")
    run_command(["git", "checkout", "--", "src/alexnet8/train.py"], project)
    (project / "notes.txt").unlink()


@pipeline
def test_a_commit_missing_from_the_clone_is_named_and_nothing_is_made(project, tmp_path):
    other = committed_repository(tmp_path / "other-clone", {"README.md": "another history\n"})
    result = subprocess.run(
        [sys.executable, "-m", "alexnet8.reproduce", "models:/alexnet8-cifar10/1"],
        cwd=other,
        env=minimal_environment(MLFLOW_TRACKING_URI=f"sqlite:///{project / 'mlflow.db'}"),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1, result.stderr
    assert "is not in this clone" in result.stderr and "Traceback" not in result.stderr
    assert not list(tmp_path.glob("other-clone-reproduce-*"))


# The team stack: a teammate's clone reproduces from the server and the remote.


@pytest.mark.stack
def test_a_teammate_reproduces_from_the_server_and_the_remote_and_a_reader_records_nothing(stack, tmp_path):  # noqa: F811
    project = stack.project
    run_command(["dvc", "repro"], project, stack.environment())
    version = _served_version(project)
    commit_all(project, "a run on the team stack")
    run_command(["dvc", "push", "-r", "stack"], project, stack.environment())

    clone = tmp_path / "teammate"
    run_command(["git", "clone", "-q", str(project), str(clone)], tmp_path, minimal_environment())
    settings, secrets = stack.state["settings"], stack.state["secrets"]
    remote = {
        "url": f"s3://{settings['bucket']}/dvc",
        "endpointurl": f"http://127.0.0.1:{settings['s3_port']}",
        "access_key_id": secrets["s3_access_key"],
        "secret_access_key": secrets["s3_secret_key"],
    }
    run_command(["dvc", "remote", "add", "--local", "stack", remote.pop("url")], clone)
    for key, value in remote.items():
        run_command(["dvc", "remote", "modify", "--local", "stack", key, value], clone)
    command = [sys.executable, "-m", "alexnet8.reproduce", f"models:/alexnet8-cifar10/{version}"]

    output = run_command([*command, "--workspace", str(tmp_path / "writer")], clone, stack.environment())
    assert f"alexnet8-cifar10 version {version}: reproduced bit for bit" in output
    assert "the archive, from the DVC remote stack" in output
    tags = stack.client().get_model_version("alexnet8-cifar10", version).tags
    assert tags["reproduction.verdict"] == BIT_FOR_BIT

    from mlflow.server import get_app_client  # as the admin: stack.client() set the credentials

    admin = get_app_client("basic-auth", tracking_uri=stack.tracking_uri)
    admin.create_user("reader", "reader-password-0123456789")  # default_permission: READ
    reader = stack.environment(MLFLOW_TRACKING_USERNAME="reader", MLFLOW_TRACKING_PASSWORD="reader-password-0123456789")
    output = run_command([*command, "--workspace", str(tmp_path / "reader")], clone, reader)
    assert f"alexnet8-cifar10 version {version}: reproduced bit for bit" in output
    assert "nothing was recorded: this user may only read" in output
    assert stack.client().get_model_version("alexnet8-cifar10", version).tags == tags
