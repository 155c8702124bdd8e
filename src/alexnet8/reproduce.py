"""`python -m alexnet8.reproduce MODEL`: rebuild a registered model version, or a run, from its
record alone, and say whether it came out the same (`make reproduce MODEL=...`).

MODEL is `models:/<name>/<version>`, `models:/<name>@<alias>` or a run id (a training run or
an evaluation run).

Reads: the MLflow store (MLFLOW_TRACKING_URI, else this checkout's mlflow.db): the version's
evaluation run and its parent, the training run: params, metrics, tags (git commit, data md5s,
machine, weights digest) and its provenance artifacts (params.yaml, dvc.lock, packages.txt,
uncommitted.diff, untracked.txt); the logged model's `.keras` file when the run has no weights
digest. Git: the run's commit must be in this clone. The archive: this clone's DVC cache, else
a DVC remote, else the run's `fetch.url`.
Writes: a git worktree at the run's commit, in a new folder (`--workspace`, default
`<checkout>-reproduce-<run>` beside the checkout), with the run's params.yaml and dvc.lock (and
its recorded uncommitted changes), where `dvc repro` runs in the current environment and logs to
the same MLflow store: the reproduction is its own runs, tagged `reproduces`. The verdict goes
to the version (or the run) as the tags `reproduction.*`. Nothing in the user's checkout changes.

The reproduction is not registered (`mlflow.registered_model_name: ""` in its params.yaml): a
new version of the same model would become the `candidate`. All else is the run's params.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import mlflow
import yaml
from mlflow.entities import Run
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from alexnet8 import cli, local_store, tracking
from alexnet8.errors import PipelineError
from alexnet8.files import file_md5
from alexnet8.metric_names import EVALUATE_HEADLINE, TRAIN_HEADLINE
from alexnet8.params import parse_yaml
from alexnet8.run_record import read_run_file
from alexnet8.tensorflow_startup import load_tensorflow

logger = logging.getLogger("alexnet8.reproduce")  # not __main__ under `python -m`

BIT_FOR_BIT = "reproduced bit for bit"
DIFFERS = "differs"
DEFAULT_TOLERANCE = 0.02  # accuracy: beyond it a reproduction on another machine kind differs
MACHINE_PREFIX = "machine."  # runtime.machine_facts' tags
REPRODUCES_TAG = "reproduces"
VERDICT_TAGS = ("reproduction.verdict", "reproduction.date", "reproduction.run_id")
# Uncommitted files that the workspace gets from the run's own record, not from its diff.
RESTORED_FILES = ("params.yaml", "dvc.lock")
# Params that say where a run is logged, or what the machine made of a param: not what was trained.
NOT_COMPARED_PARAMS = re.compile(r"^(mlflow\.|derived\.jit_compile$)")
# Metrics of speed, and MLflow's system metrics, differ between any two runs.
NOT_COMPARED_METRICS = re.compile(r"^system/|second|_time|time_|duration|throughput")
MACHINE_WORDS = {
    "machine.cpu": "different CPU kind",
    "machine.cpu_features": "different CPU kind",
    "machine.threads": "thread count",
    "machine.gpus": "different GPUs",
}


@dataclasses.dataclass(frozen=True)
class Source:
    """What the store records of the model to reproduce."""

    label: str  # `alexnet8-cifar10 version 3`, or `run <id>`
    training_run_id: str
    evaluation_run_id: str | None
    commit: str | None
    dirty: bool
    params: Mapping[str, str]  # the training run's
    metrics: Mapping[str, float]  # the training run's last values and the evaluation's
    tags: Mapping[str, str]  # the training run's
    files: Mapping[str, str]  # provenance artifact name (params.yaml, ...) -> text
    weights_digest: str | None
    digest_origin: str  # where weights_digest came from


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What the reproduction gave, and the environment it ran in."""

    training_run_id: str
    evaluation_run_id: str | None
    params: Mapping[str, str]
    metrics: Mapping[str, float]
    prepared_md5: str | None
    weights_digest: str
    machine: Mapping[str, str]  # runtime.machine_facts() here
    packages: str  # tracking.installed_packages() here
    unrestored: Sequence[str]  # files of the run's checkout the workspace could not have


@dataclasses.dataclass(frozen=True)
class Verdict:
    headline: str  # BIT_FOR_BIT, `reproduced within X (...: expected)`, or DIFFERS
    details: list[str]


def parse_packages(text: str) -> dict[str, str]:
    """`name==version` lines (packages.txt) -> {lowercased name: version}."""
    pairs = (line.split("==", 1) for line in text.splitlines() if "==" in line)
    return {name.strip().lower().replace("_", "-"): version.strip() for name, version in pairs}


def package_differences(recorded: str, here: str) -> list[str]:
    """Each package whose version here is not the run's: `keras 3.15.1 here, 3.10.0 in the run`."""
    run, now = parse_packages(recorded), parse_packages(here)
    return [
        f"{name} {now.get(name, 'missing')} here, {run.get(name, 'missing')} in the run"
        for name in sorted(run.keys() | now.keys())
        if run.get(name) != now.get(name)
    ]


def machine_differences(recorded: Mapping[str, str], here: Mapping[str, str]) -> list[str]:
    """Each machine fact that differs: `machine.threads: 8 here, 2 in the run`."""
    return [
        f"{key}: {here.get(key, 'unknown')} here, {value} in the run"
        for key, value in sorted(recorded.items())
        if key.startswith(MACHINE_PREFIX) and key in MACHINE_WORDS and here.get(key) != value
    ]


def machine_tags(tags: Mapping[str, str]) -> dict[str, str]:
    return {key: value for key, value in tags.items() if key.startswith(MACHINE_PREFIX)}


def expected_causes(source: Source, outcome: Outcome) -> tuple[list[str], list[str]]:
    """Why the weights may differ with no fault (different CPU kind, thread count, XLA, packages),
    in a word each, and the facts behind them."""
    causes = []
    recorded = machine_tags(source.tags)
    for key, word in MACHINE_WORDS.items():
        if key in recorded and outcome.machine.get(key) != recorded[key] and word not in causes:
            causes.append(word)
    facts = machine_differences(recorded, outcome.machine)
    xla = source.params.get("derived.jit_compile"), outcome.params.get("derived.jit_compile")
    if xla[0] != xla[1]:
        causes.append("XLA")
        facts.append(f"jit_compile {xla[1]} here, {xla[0]} in the run")
    if "packages.txt" in source.files and package_differences(source.files["packages.txt"], outcome.packages):
        causes.append("packages")
    return causes, facts


def param_differences(source: Source, outcome: Outcome) -> list[str]:
    keys = {key for key in source.params.keys() | outcome.params.keys() if not NOT_COMPARED_PARAMS.match(key)}
    return [
        f"param {key}: {outcome.params.get(key, 'missing')} here, {source.params.get(key, 'missing')} in the run"
        for key in sorted(keys)
        if source.params.get(key) != outcome.params.get(key)
    ]


def metric_differences(source: Source, outcome: Outcome) -> dict[str, tuple[float, float]]:
    """The metrics both record that are not equal: name -> (the run's, the reproduction's)."""
    common = {name for name in source.metrics.keys() & outcome.metrics.keys() if not NOT_COMPARED_METRICS.search(name)}
    return {
        name: (source.metrics[name], outcome.metrics[name])
        for name in sorted(common)
        if source.metrics[name] != outcome.metrics[name]
    }


def unchecked(source: Source) -> list[str]:
    """What the run's record lacks, in words: what this reproduction cannot check or restore."""
    notes = []
    if not machine_tags(source.tags):
        notes.append(
            "the run did not record its machine (CPU, threads): whether bit-identical weights are expected "
            "cannot be checked"
        )
    if source.weights_digest is None:
        notes.append("the run has no weights digest and no logged model: its weights cannot be compared")
    if "packages.txt" not in source.files:
        notes.append("the run did not record its packages: package differences cannot be checked")
    if source.dirty and tracking.UNCOMMITTED_DIFF not in source.files:
        notes.append(
            "the run's checkout had uncommitted changes, not recorded: params.yaml is the run's, any other "
            "change cannot be restored"
        )
    return notes


def judge(source: Source, outcome: Outcome, tolerance: float = DEFAULT_TOLERANCE) -> Verdict:
    """The verdict: the weights digests and metrics compared, knowing what may make them differ."""
    details = unchecked(source)
    if outcome.unrestored:
        shown, more = ", ".join(outcome.unrestored[:10]), len(outcome.unrestored) - 10
        details.append(
            f"not restored (files git did not track in the run's checkout): {shown}"
            + (f" and {more} more" if more > 0 else "")
        )
    # What differs that no machine explains: the inputs.
    inputs = param_differences(source, outcome)
    recorded_prepared = source.tags.get("data.prepared_md5")
    if recorded_prepared and outcome.prepared_md5 != recorded_prepared:
        inputs.append(f"prepared data md5 {outcome.prepared_md5} here, {recorded_prepared} in the run")
    # What differs in the results.
    results = []
    if source.weights_digest is not None and source.weights_digest != outcome.weights_digest:
        results.append(
            f"weights sha256 {outcome.weights_digest[:12]}... here, {source.weights_digest[:12]}... in the run"
        )
    metrics = metric_differences(source, outcome)
    results += [f"{name} {here:.6g} here, {run:.6g} in the run" for name, (run, here) in metrics.items()]
    if not inputs and not results:
        headline = (
            BIT_FOR_BIT if source.weights_digest else "reproduced within 0 (every metric equal; weights not compared)"
        )
        return Verdict(headline, details)
    causes, facts = expected_causes(source, outcome)
    results += facts
    gap = max((abs(run - here) for name, (run, here) in metrics.items() if "accuracy" in name), default=0.0)
    if not inputs and causes and gap <= tolerance:
        return Verdict(f"reproduced within {gap:.4f} ({' / '.join(causes)}: expected)", results + details)
    if not inputs and causes:
        results.append(f"accuracy differs by {gap:.4f}, more than {tolerance} ({' / '.join(causes)} may explain less)")
    elif not inputs and machine_tags(source.tags):
        results.append("same CPU kind, thread count, XLA choice and packages: bit-identical weights were expected")
    return Verdict(DIFFERS, inputs + results + details)


def report(source: Source, outcome: Outcome, verdict: Verdict) -> str:
    """The verdict as the command prints it."""
    lines = [f"{source.label}: {verdict.headline}"]
    lines += [f"  {detail}" for detail in verdict.details]
    if source.weights_digest:
        lines.append(f"  weights sha256 {outcome.weights_digest} ({source.digest_origin}: {source.weights_digest})")
    for name in (*EVALUATE_HEADLINE, *TRAIN_HEADLINE):
        if name in source.metrics and name in outcome.metrics:
            lines.append(f"  {name} {outcome.metrics[name]:.4f} (the run's: {source.metrics[name]:.4f})")
    differing = package_differences(source.files.get("packages.txt", ""), outcome.packages)
    if "packages.txt" in source.files:
        lines.append(f"  packages that differ from the run's: {'; '.join(differing) or 'none'}")
    lines.append(f"  reproduction: training run {outcome.training_run_id}, evaluation run {outcome.evaluation_run_id}")
    return "\n".join(lines) + "\n"


def parse_reference(reference: str) -> tuple[str, str | None, str | None]:
    """`models:/NAME/VERSION` -> ("version", NAME, VERSION); `models:/NAME@ALIAS` -> ("alias", NAME,
    ALIAS); a run id -> ("run", ID, None). A PipelineError saying what to give for anything else."""
    match = re.fullmatch(r"models:/([^/@]+)/(\d+)", reference)
    if match:
        return "version", match[1], match[2]
    match = re.fullmatch(r"models:/([^/@]+)@([\w-]+)", reference)
    if match:
        return "alias", match[1], match[2]
    if re.fullmatch(r"[0-9a-f]{32}", reference):
        return "run", reference, None
    raise PipelineError(
        f"{reference!r} is not a model to reproduce: give models:/<name>/<version>, models:/<name>@<alias> "
        "or a run id (32 hex digits)"
    )


def changed_files(diff: str) -> list[str]:
    """The files a `git diff` changes."""
    return sorted(set(re.findall(r"^diff --git a/(\S+) b/", diff, re.MULTILINE)))


def code_changes(diff: str, dvc_lock: str) -> list[str]:
    """The files a run's uncommitted diff changes, but params.yaml and dvc.lock (restored from the
    run's own copies) and the outputs of its stages (which the pipeline makes again)."""
    stages = (yaml.safe_load(dvc_lock or "{}") or {}).get("stages", {})
    outputs = {out["path"].rstrip("/") for stage in stages.values() for out in stage.get("outs", [])}
    return [
        name
        for name in changed_files(diff)
        if name not in RESTORED_FILES and not any(name == out or name.startswith(f"{out}/") for out in outputs)
    ]


# What follows reads and writes: the store, git, DVC, the workspace.


def checkout_root() -> Path:
    """The git checkout this command runs in (the user's), which it only reads."""
    result = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True)
    if result.returncode != 0:
        raise PipelineError(f"{Path.cwd()} is not in a git clone of the project: run `make reproduce` in one")
    return Path(result.stdout.strip())


def open_store(root: Path) -> tuple[mlflow.MlflowClient, str]:
    """The client of the store the runs are in: MLFLOW_TRACKING_URI, else the checkout's mlflow.db."""
    tracking.bound_http_requests()
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        if not (root / local_store.STORE_FILE).is_file():
            raise PipelineError(
                f"no MLflow store in {root} ({local_store.STORE_FILE} not found): run this in the clone that made "
                "the run, or set MLFLOW_TRACKING_URI to the store or server that holds it"
            )
        local_store.keep_inside(root)  # a moved clone's store finds its artifacts again
        uri = local_store.store_uri(root)
    mlflow.set_tracking_uri(uri)
    return mlflow.MlflowClient(uri), uri


def _find_runs(client: mlflow.MlflowClient, reference: str) -> tuple[str, Run, Run | None, ModelVersion | None]:
    """The label, the training run, the evaluation run (None: none) and the version (None for a run id)."""
    kind, first, second = parse_reference(reference)
    version = None
    try:
        if kind == "version":
            version = client.get_model_version(first, second)
        elif kind == "alias":
            version = client.get_model_version_by_alias(first, second)
        run = client.get_run(version.run_id if version else first)
        parent = run.data.tags.get("mlflow.parentRunId")
        training = client.get_run(parent) if parent else run
    except MlflowException as error:
        raise PipelineError(
            f"{reference} cannot be read at {mlflow.get_tracking_uri()}: {tracking.failure_reason(error)}"
        ) from None
    evaluation = run if parent else _newest_evaluation(client, training)
    label = f"{version.name} version {version.version}" if version else f"run {training.info.run_id}"
    return label, training, evaluation, version


def _newest_evaluation(client: mlflow.MlflowClient, training: Run) -> Run | None:
    children = client.search_runs(
        [training.info.experiment_id],
        f"tags.mlflow.parentRunId = '{training.info.run_id}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return children[0] if children else None


def _provenance_files(client: mlflow.MlflowClient, run_id: str) -> dict[str, str]:
    """The run's provenance/ artifacts by file name (params.yaml, dvc.lock, packages.txt, ...)."""
    with tempfile.TemporaryDirectory(prefix="alexnet8-reproduce-") as folder:
        try:
            local = Path(client.download_artifacts(run_id, "provenance", folder))
        except (MlflowException, OSError):
            return {}
        # Decoded without translating line endings: the diff must apply byte for byte.
        return {
            path.name: path.read_bytes().decode("utf-8", "surrogateescape")
            for path in local.iterdir()
            if path.is_file()
        }


def _logged_model_location(client: mlflow.MlflowClient, version: ModelVersion | None, evaluation: Run | None):
    """Where the served model's artifacts are (its `.keras` file in artifacts/), or None."""
    try:
        if version is not None and str(version.source).startswith("models:/m-"):
            return client.get_logged_model(str(version.source).removeprefix("models:/")).artifact_location
        if evaluation is not None:
            logged = mlflow.search_logged_models(
                experiment_ids=[evaluation.info.experiment_id],
                filter_string=f"source_run_id = '{evaluation.info.run_id}'",
                output_format="list",
            )
            return logged[0].artifact_location if logged else None
    except MlflowException:
        return None
    return None


def _source_digest(training: Run, model_location: str | None) -> tuple[str | None, str]:
    """The weights digest the training run recorded, else that of the `.keras` file in its logged model."""
    if tracking.WEIGHTS_DIGEST_TAG in training.data.tags:
        return training.data.tags[tracking.WEIGHTS_DIGEST_TAG], "the run's"
    if model_location is None:
        return None, "none"
    with tempfile.TemporaryDirectory(prefix="alexnet8-reproduce-") as folder:
        try:
            path = mlflow.artifacts.download_artifacts(
                artifact_uri=f"{model_location}/artifacts/model.keras", dst_path=folder
            )
        except (MlflowException, OSError):
            return None, "none"
        return saved_weights_digest(path), "the logged model's"


def read_source(client: mlflow.MlflowClient, reference: str) -> tuple[Source, ModelVersion | None]:
    label, training, evaluation, version = _find_runs(client, reference)
    tags = training.data.tags
    digest, origin = _source_digest(training, _logged_model_location(client, version, evaluation))
    source = Source(
        label=label,
        training_run_id=training.info.run_id,
        evaluation_run_id=evaluation.info.run_id if evaluation else None,
        commit=tags.get("git.commit") or tags.get("mlflow.source.git.commit"),
        dirty=tags.get("git.dirty") == "true",
        params=training.data.params,
        metrics={**training.data.metrics, **(evaluation.data.metrics if evaluation else {})},
        tags=tags,
        files=_provenance_files(client, training.info.run_id),
        weights_digest=digest,
        digest_origin=origin,
    )
    return source, version


def _with_tensorflow() -> None:
    """Load TensorFlow once, without its start-up noise: network.py and runtime.py import it."""
    if "tensorflow" not in sys.modules:
        load_tensorflow()


def saved_weights_digest(path: str | Path) -> str:
    _with_tensorflow()
    from alexnet8.network import saved_weights_digest as digest

    return digest(path)


def machine_here() -> dict[str, str]:
    _with_tensorflow()
    from alexnet8.runtime import machine_facts

    return machine_facts()


def _git(folder: Path, *arguments: str, stdin: str = "") -> subprocess.CompletedProcess:
    """`git ...` in `folder`; `stdin` is given as the bytes it was read from (_provenance_files)."""
    result = subprocess.run(
        ["git", *arguments], cwd=folder, input=stdin.encode("utf-8", "surrogateescape"), capture_output=True
    )
    return subprocess.CompletedProcess(result.args, result.returncode, result.stdout.decode(), result.stderr.decode())


def make_workspace(root: Path, commit: str | None, workspace: Path) -> None:
    """A git worktree of `root` at `commit` in the new folder `workspace`; `root` itself is left as it is."""
    if not commit:
        raise PipelineError("the run records no git commit: there is nothing to rebuild it from")
    if _git(root, "cat-file", "-e", f"{commit}^{{commit}}").returncode != 0:
        raise PipelineError(
            f"commit {commit}, the run's, is not in this clone ({root}): fetch it (`git fetch --all`, or push it "
            "from the clone that made the run), then run this again"
        )
    if workspace.exists():
        raise PipelineError(
            f"{workspace} exists (an earlier reproduction?): remove it (`git worktree remove --force {workspace}`) "
            "or name another folder (WORKSPACE=...)"
        )
    added = _git(root, "worktree", "add", "--detach", str(workspace), commit)
    if added.returncode != 0:
        raise PipelineError(f"git cannot make the workspace {workspace}: {added.stderr.strip()}")
    logger.info("workspace: %s, a git worktree at %s (this checkout is not touched)", workspace, commit[:12])


def restore_inputs(workspace: Path, root: Path, source: Source) -> None:
    """Into the workspace: the run's uncommitted changes to code (its recorded diff), params.yaml
    and dvc.lock, and this checkout's DVC settings (.dvc/config.local: a remote's credentials)."""
    diff = source.files.get(tracking.UNCOMMITTED_DIFF, "")
    changed = code_changes(diff, source.files.get("dvc.lock", ""))
    if changed:
        included = [f"--include={name}" for name in changed]
        applied = _git(workspace, "apply", "--binary", *included, "-", stdin=diff)
        if applied.returncode != 0:
            raise PipelineError(f"the run's uncommitted changes do not apply to its commit: {applied.stderr.strip()}")
        logger.warning("restored the run's uncommitted changes to %s from its provenance", ", ".join(changed))
    if "params.yaml" not in source.files:
        raise PipelineError(f"run {source.training_run_id} has no provenance/params.yaml: its params are unknown")
    params = parse_yaml(source.files["params.yaml"], source=f"run {source.training_run_id}'s provenance/params.yaml")
    if isinstance(params.get("mlflow"), dict) and "registered_model_name" in params["mlflow"]:
        params["mlflow"]["registered_model_name"] = ""  # see the module's docstring
    (workspace / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    if "dvc.lock" in source.files:
        (workspace / "dvc.lock").write_bytes(source.files["dvc.lock"].encode("utf-8", "surrogateescape"))
    if (root / ".dvc" / "config.local").is_file():
        shutil.copy2(root / ".dvc" / "config.local", workspace / ".dvc" / "config.local")


def pipeline_environment(workspace: Path, tracking_uri: str) -> dict[str, str]:
    """The environment `dvc repro` runs in, in the workspace: this one's interpreter and packages,
    the workspace's own code, the source's MLflow store."""
    environment = {key: value for key, value in os.environ.items() if not key.startswith(("DVC_", "MLFLOW_RUN"))}
    environment.pop("MLFLOW_EXPERIMENT_ID", None)
    environment["VIRTUAL_ENV"] = sys.prefix
    environment["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), environment.get("PATH", "")])
    # The environment has this project installed editable, pointing at the checkout it was made
    # in: without PYTHONPATH, `python -m alexnet8` in the workspace would run that checkout's
    # code, not the commit's.
    environment["PYTHONPATH"] = str(workspace / "src")
    # The stages would log to the workspace's own mlflow.db (tracking.use_project_store).
    environment["MLFLOW_TRACKING_URI"] = tracking_uri
    return environment


def dvc(workspace: Path, environment: Mapping[str, str], *arguments: str, quiet: bool = False):
    """`dvc ...` in the workspace; its output goes to the terminal unless `quiet` (then it is returned)."""
    command = [str(Path(sys.executable).parent / "dvc"), *arguments]
    return subprocess.run(command, cwd=workspace, env=dict(environment), capture_output=quiet, text=True)


def place_archive(workspace: Path, root: Path, source: Source, environment: Mapping[str, str]) -> None:
    """The run's archive where its fetch stage left it: from this clone's DVC cache, else a DVC
    remote, else the fetch stage downloads it from the run's `fetch.url`; its md5 must be the run's."""
    md5 = source.tags.get("data.archive_md5")
    lock = yaml.safe_load(source.files.get("dvc.lock") or "{}") or {}
    outs = lock.get("stages", {}).get("fetch", {}).get("outs") or []
    if not md5 or not outs:
        logger.warning("the run records no archive md5 or fetch stage: the archive is not checked before the run")
        return
    target = workspace / outs[0]["path"]
    target.parent.mkdir(parents=True, exist_ok=True)
    origin = _archive_from_cache(root, workspace, md5, target) or _archive_from_remotes(
        workspace, environment, md5, target
    )
    if origin is None:
        origin = f"the run's fetch.url ({source.params.get('fetch.url')})"
        logger.info("getting the archive from %s", origin)
        if dvc(workspace, environment, "repro", "fetch").returncode != 0:
            raise PipelineError(f"the fetch stage failed in {workspace} (its output is above)")
    found = file_md5(target) if target.is_file() else "none (no file)"
    if found != md5:
        raise PipelineError(f"the archive from {origin} has md5 {found}, not the run's {md5}: it is other data")
    logger.info("the archive, from %s, has the run's md5 %s", origin, md5)


def _cache_path(dvc_folder: Path, md5: str) -> Path:
    return dvc_folder / "cache" / "files" / "md5" / md5[:2] / md5[2:]


def _archive_from_cache(root: Path, workspace: Path, md5: str, target: Path) -> str | None:
    """The archive from this clone's DVC cache, into the workspace and its own cache: DVC reruns
    a stage whose output is not in its cache, and the fetch stage would download it again."""
    cached = _cache_path(root / ".dvc", md5)
    if not cached.is_file():
        return None
    workspace_cache = _cache_path(workspace / ".dvc", md5)
    workspace_cache.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(cached, workspace_cache)
    shutil.copyfile(cached, target)
    return "this clone's DVC cache"


def _archive_from_remotes(workspace: Path, environment: Mapping[str, str], md5: str, target: Path) -> str | None:
    """The archive from the first DVC remote that holds it, asked by its md5 (a .dvc file naming it)."""
    listed = dvc(workspace, environment, "remote", "list", quiet=True)
    remotes = [line.split()[0] for line in listed.stdout.splitlines() if line.strip()]
    pointer = workspace / ".reproduce-archive.dvc"
    pointer.write_text(yaml.safe_dump({"outs": [{"md5": md5, "path": ".reproduce-archive", "hash": "md5"}]}))
    try:
        for remote in remotes:
            fetched = dvc(workspace, environment, "fetch", "--remote", remote, pointer.name, quiet=True)
            if fetched.returncode == 0 and _cache_path(workspace / ".dvc", md5).is_file():
                shutil.copyfile(_cache_path(workspace / ".dvc", md5), target)
                return f"the DVC remote {remote}"
            logger.warning("the DVC remote %s does not hold the archive (md5 %s)", remote, md5)
    finally:
        pointer.unlink(missing_ok=True)
    return None


def run_pipeline(workspace: Path, environment: Mapping[str, str]) -> None:
    logger.info("running the pipeline in %s: `dvc repro`", workspace)
    if dvc(workspace, environment, "repro").returncode != 0:
        raise PipelineError(
            f"`dvc repro` failed in {workspace} (its output is above): nothing was compared. Fix the cause and "
            f"rerun it there, or remove the workspace (`git worktree remove --force {workspace}`) and start over"
        )


def _json_file(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def read_outcome(client: mlflow.MlflowClient, workspace: Path, source: Source) -> Outcome:
    """What the pipeline in the workspace made: its runs (named by models/mlflow_run.json and
    models/served_model.json), its model's weights digest, and this machine and environment."""
    training_id = read_run_file(workspace / "models" / "mlflow_run.json").run_id
    training = client.get_run(training_id)
    served = _json_file(workspace / "models" / "served_model.json") or {}
    evaluation = client.get_run(served["run_id"]) if "run_id" in served else _newest_evaluation(client, training)
    untracked = source.files.get(tracking.UNTRACKED_FILES, "").splitlines()
    return Outcome(
        training_run_id=training_id,
        evaluation_run_id=evaluation.info.run_id if evaluation else None,
        params=training.data.params,
        metrics={**training.data.metrics, **(evaluation.data.metrics if evaluation else {})},
        prepared_md5=training.data.tags.get("data.prepared_md5"),
        weights_digest=saved_weights_digest(workspace / "models" / "model.keras"),
        machine=machine_here(),
        packages=tracking.installed_packages(),
        unrestored=[name for name in untracked if name not in RESTORED_FILES and not (workspace / name).exists()],
    )


def can_record(client: mlflow.MlflowClient, source: Source) -> bool:
    """Whether this user may log to the store: a try at tagging the run `reproduction.started`.
    A user who may only read (a team server's READ permission) gets False."""
    try:
        client.set_tag(source.training_run_id, "reproduction.started", _now())
    except MlflowException as error:
        if error.error_code in ("PERMISSION_DENIED", "UNAUTHENTICATED"):
            logger.warning(
                "this user may only read at %s: the reproduction logs to the workspace's own mlflow.db, and "
                "nothing is recorded here",
                mlflow.get_tracking_uri(),
            )
            return False
        raise PipelineError(
            f"MLflow at {mlflow.get_tracking_uri()} takes no tag: {tracking.failure_reason(error)}"
        ) from None
    return True


def record(client: mlflow.MlflowClient, source: Source, outcome: Outcome, verdict: Verdict, version) -> None:
    """The reproduction's runs say which runs they reproduce; the version (or the run) gets the verdict."""
    client.set_tag(outcome.training_run_id, REPRODUCES_TAG, source.training_run_id)
    client.set_tag(outcome.training_run_id, VERDICT_TAGS[0], verdict.headline)
    if outcome.evaluation_run_id and source.evaluation_run_id:
        client.set_tag(outcome.evaluation_run_id, REPRODUCES_TAG, source.evaluation_run_id)
    values = dict(zip(VERDICT_TAGS, (verdict.headline, _now(), outcome.training_run_id), strict=True))
    for key, value in values.items():
        client.set_tag(source.training_run_id, key, value)
        if version is not None:
            client.set_model_version_tag(version.name, str(version.version), key, value)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def describe_source(source: Source) -> None:
    """Log what the run records, and what it lacks, before anything runs."""
    tags, params = source.tags, source.params
    machine = machine_tags(tags)
    logger.info(
        "%s: training run %s (evaluation run %s), commit %s%s, archive md5 %s, precision %s, jit_compile %s, "
        "machine: %s",
        source.label,
        source.training_run_id,
        source.evaluation_run_id,
        source.commit,
        " with uncommitted changes" if source.dirty else "",
        tags.get("data.archive_md5"),
        params.get("train.precision"),
        params.get("derived.jit_compile"),
        f"{machine.get('machine.cpu')} ({machine.get('machine.cpu_features')}), {machine.get('machine.threads')} "
        f"threads, GPUs: {machine.get('machine.gpus')}"
        if machine
        else "not recorded",
    )
    for note in unchecked(source):
        logger.warning("%s", note)
    if "packages.txt" in source.files:
        differing = package_differences(source.files["packages.txt"], tracking.installed_packages())
        if differing:
            logger.warning(
                "%d package(s) here differ from the run's (bit-identical weights are not expected): %s",
                len(differing),
                "; ".join(differing),
            )


def default_workspace(root: Path, source: Source) -> Path:
    return root.parent / f"{root.name}-reproduce-{source.training_run_id[:8]}"


def main(argv: Sequence[str] | None = None) -> None:
    argument_parser = cli.parser(__doc__.splitlines()[0], reads_params=False)
    argument_parser.add_argument("model", help="models:/<name>/<version>, models:/<name>@<alias>, or a run id")
    argument_parser.add_argument("--workspace", help="the new folder to rebuild in (default: beside this checkout)")
    argument_parser.add_argument(
        "--tolerance",
        type=float,
        default=DEFAULT_TOLERANCE,
        help=f"accuracy difference accepted from another machine kind or packages (default: {DEFAULT_TOLERANCE})",
    )
    arguments = argument_parser.parse_args(argv)
    parse_reference(arguments.model)  # a bad argument fails before anything is read

    root = checkout_root()
    client, tracking_uri = open_store(root)
    source, version = read_source(client, arguments.model)
    describe_source(source)
    workspace = Path(arguments.workspace or default_workspace(root, source)).resolve()
    make_workspace(root, source.commit, workspace)
    writable = can_record(client, source)
    pipeline_uri = tracking_uri if writable else local_store.store_uri(workspace)
    restore_inputs(workspace, root, source)
    environment = pipeline_environment(workspace, pipeline_uri)
    place_archive(workspace, root, source, environment)
    run_pipeline(workspace, environment)

    outcome = read_outcome(mlflow.MlflowClient(pipeline_uri), workspace, source)
    verdict = judge(source, outcome, arguments.tolerance)
    sys.stdout.write(report(source, outcome, verdict))
    if writable:
        record(client, source, outcome, verdict, version)
        sys.stdout.write(f"  recorded: tags reproduction.* on {source.label}, at {tracking_uri}\n")
    else:
        sys.stdout.write(f"  nothing was recorded: this user may only read at {tracking_uri}\n")
    sys.stdout.write(f"  workspace: {workspace} (remove it: git worktree remove --force {workspace})\n")


INTERRUPTED = (
    "interrupted: nothing was compared or recorded. The workspace named above stays; "
    "`git worktree remove --force <workspace>` removes it"
)

if __name__ == "__main__":
    cli.run(main, interrupted=INTERRUPTED)
