"""MLflow runs for the train, evaluate and plot stages: one pipeline run is one MLflow run.

Reads and writes the run file (`--run-file` in dvc.yaml, run_record.py): train starts the run
and writes it; evaluate and plot read it to log into the same run.

Where runs go: `MLFLOW_TRACKING_URI` when set (a tracking server, a database); otherwise
MLflow's default store in the project root (`mlflow.db`, artifacts in `mlruns/`), which a plain
`mlflow ui` started there shows. "The project root" is the folder the pipeline runs in, except
for experiments that DVC runs in a temporary copy (`dvc exp run --queue`, `--temp`): those log
to the store of the project they were queued from, not to a copy that DVC deletes. Under
`mlflow run` the launcher's run (`MLFLOW_RUN_ID`) is used, so the project run and the pipeline
run are the same.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import importlib.metadata
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from urllib.parse import urlparse

import mlflow
from mlflow.data import dataset_source_registry
from mlflow.data.meta_dataset import MetaDataset
from mlflow.exceptions import MlflowException

from alexnet8 import library_patches, local_store
from alexnet8.dataset import DatasetDescription
from alexnet8.errors import PipelineError
from alexnet8.params import Params
from alexnet8.run_record import RunRecord, read_run_file, write_run_file

logger = logging.getLogger(__name__)


SERVER_TIMEOUT_SECONDS = 5
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EVALUATE_PREFIX = "evaluate."
# MLflow's UI (3.17) restores a runs-table view from the experiment tag `mlflow.sharedViewState.<key>`
# when the address says `viewStateShareKey=<key>`: the columns a user compares runs on. Training
# runs fill the params and val/* columns; the evaluations nested under them (expand a run) the rest.
SHARED_VIEW_PREFIX = "mlflow.sharedViewState."
RUNS_VIEW_TAG = f"{SHARED_VIEW_PREFIX}alexnet8-runs"
RUNS_VIEW = {
    "selectedColumns": [
        *(f"metrics.`{name}`" for name in ("val/accuracy", "test/accuracy", "val_served/accuracy", "train/loss")),
        *(
            f"params.`{name}`"
            for name in (
                "train.optimizer",
                "train.learning_rate",
                "train.batch_size",
                "train.epochs",
                "seed",
                "evaluate.flip_tta",
                "evaluate.tta_translate",
            )
        ),
    ],
    "orderByKey": "attributes.start_time",
    "orderByAsc": False,
}

# MLflow's client retries a request to a tracking server 7 times with backoff, each try waiting up
# to 120 s: a server that died costs about 4 minutes per request. The stages' bounds: 2 retries
# after 0 and about 2 s, 20 s for each connect or read. A user's own MLFLOW_HTTP_REQUEST_* win.
HTTP_REQUEST_BOUNDS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}
# At the end of training, how long to wait for a server that does not answer, before the stage
# fails (the model saved, to be logged by the rerun): long enough for a server's restart.
RESTART_GRACE_SECONDS = 30
# What the server must answer besides /health, which answers 200 while its database is down.
DATABASE_PROBE = "/api/2.0/mlflow/experiments/search?max_results=1"
# Ending a run that is being stopped or has failed: one try, briefly (Ctrl-C must act at once).
LAST_REQUEST_BOUNDS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "1"}


def use_project_store() -> None:
    """Log to the project root's local store unless MLFLOW_TRACKING_URI says otherwise; a store
    copied or moved with the project is first made to keep its artifacts inside it."""
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        local_store.keep_inside(local_store.project_root())
        mlflow.set_tracking_uri(local_store.store_uri())  # which also sets MLFLOW_TRACKING_URI
        _create_project_store()


def _create_project_store() -> None:
    """Create or upgrade the local store's tables holding a lock on the project folder: stages that
    start at once on a new mlflow.db (`dvc queue start -j 2`) would each run MLflow's migrations,
    and all but one fail (`table ... already exists`). With the tables in place this only checks."""
    folder = os.open(local_store.project_root(), os.O_RDONLY)
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)
        client = mlflow.MlflowClient()
        client.search_experiments(max_results=1)  # the tracking store's tables
        client.search_registered_models(max_results=1)  # and the model registry's
    finally:
        os.close(folder)  # which releases the lock


def set_experiment(name: str) -> None:
    """Set the experiment, creating it if needed: in the local store its artifacts go to
    <project root>/mlruns, and MLflow's UI opens it as a model-training experiment, its runs
    table showing the key params and metrics (RUNS_VIEW_TAG)."""
    experiment = mlflow.get_experiment_by_name(name)
    view = json.dumps(RUNS_VIEW)
    if experiment is None:
        local = mlflow.get_tracking_uri() == local_store.store_uri()
        root = local_store.project_root()
        artifact_location = (root / local_store.ARTIFACTS_FOLDER).as_uri() if local else None
        # The tag MLflow's UI sets when one picks the experiment's kind; which view opens (GenAI or
        # model training) is the UI's toggle or its workflowType URL parameter (see `make ui`).
        tags = {EXPERIMENT_KIND_TAG: "custom_model_development", RUNS_VIEW_TAG: view}
        with contextlib.suppress(MlflowException):  # created meanwhile by a parallel experiment
            mlflow.create_experiment(name, artifact_location=artifact_location, tags=tags)
    elif experiment.tags.get(RUNS_VIEW_TAG) != view:
        mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, RUNS_VIEW_TAG, view)
    mlflow.set_experiment(name)


def runs_page_url(base_url: str, experiment_name: str) -> str:
    """The address of the experiment's runs table in MLflow's UI, in model-training mode, with the
    columns of RUNS_VIEW; the experiments list while the experiment does not exist yet."""
    experiment = mlflow.get_experiment_by_name(experiment_name)
    if experiment is None:
        return f"{base_url}/#/experiments?workflowType=machine_learning"
    query = f"workflowType=machine_learning&viewStateShareKey={RUNS_VIEW_TAG.removeprefix(SHARED_VIEW_PREFIX)}"
    return f"{base_url}/#/experiments/{experiment.experiment_id}/runs?{query}"


def provenance_tags() -> dict[str, str]:
    """What it takes to recreate a run: git commit and dirtiness, the DVC experiment, the command."""
    tags = {"command": " ".join(sys.orig_argv)}
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc.experiment"] = os.environ["DVC_EXP_NAME"]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        changes = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return tags  # not a git checkout (or no git): nothing to record
    # Under `dvc exp run -S ...` the tree is dirty by design: params.yaml holds the experiment's values.
    tags |= {"git.commit": commit, "mlflow.source.git.commit": commit, "git.dirty": str(bool(changes.strip())).lower()}
    return tags


# In a training run's provenance/: what its commit lacks (reproduce.py restores or names it).
UNCOMMITTED_DIFF = "uncommitted.diff"
UNTRACKED_FILES = "untracked.txt"
# The training run's tag holding model.saved_weights_digest of its model (reproduce.py compares it).
WEIGHTS_DIGEST_TAG = "weights.sha256"


def uncommitted_changes() -> tuple[bytes, str]:
    """What the run's commit lacks: `git diff --binary HEAD` of the tracked files, as bytes (a
    file's own line endings, which `git apply` needs), and the names of the untracked files git
    does not ignore, one a line (their content is not kept). Both empty for a clean tree, or
    outside a git checkout."""
    try:
        diff = subprocess.run(["git", "diff", "--binary", "HEAD"], capture_output=True, check=True).stdout
        untracked = subprocess.run(
            ["git", "ls-files", "--others", "--exclude-standard"], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return b"", ""
    return diff, untracked


def _log_uncommitted_changes() -> None:
    """Into provenance/: the diff of a tree with uncommitted changes (under `dvc exp run -S`,
    params.yaml and dvc.lock at least) and the untracked files' names; nothing for a clean tree."""
    diff, untracked = uncommitted_changes()
    if diff:
        with tempfile.TemporaryDirectory(prefix="alexnet8-") as folder:
            (Path(folder) / UNCOMMITTED_DIFF).write_bytes(diff)
            mlflow.log_artifact(str(Path(folder) / UNCOMMITTED_DIFF), artifact_path="provenance")
    if untracked:
        mlflow.log_text(untracked, f"provenance/{UNTRACKED_FILES}")


def installed_packages() -> str:
    """`name==version` of every installed distribution, sorted: the environment the run used."""
    versions = {
        distribution.metadata["Name"]: distribution.version for distribution in importlib.metadata.distributions()
    }
    return "".join(
        f"{name}=={version}\n" for name, version in sorted(versions.items(), key=lambda item: item[0].lower())
    )


def bound_http_requests() -> None:
    """Bound the MLflow client's retries and timeouts in this process (HTTP_REQUEST_BOUNDS), unless
    the user set them: a tracking server that does not answer costs seconds, not minutes."""
    library_patches.MLFLOW_HTTP_RETRIES.check()
    for name, value in HTTP_REQUEST_BOUNDS.items():
        os.environ.setdefault(name, value)


@contextlib.contextmanager
def _last_request_bounds() -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in LAST_REQUEST_BOUNDS}
    os.environ.update(LAST_REQUEST_BOUNDS)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def failure_reason(error: BaseException, handled: BaseException | None = None) -> str:
    """What went wrong at the bottom of an MLflow client error, with its class:
    `ConnectionRefusedError: [Errno 111] Connection refused` rather than the request's URL, the
    retry policy and the exception classes around it. The chain is followed through errors only,
    and not into `handled`: the exception being handled when the request was made (a Ctrl-C, the
    stage's own error) is not why the request failed."""
    root, seen = error, {id(error)}
    while True:
        below = root.__cause__ or root.__context__
        if below is None or below is handled or not isinstance(below, Exception) or id(below) in seen:
            break
        root = below
        seen.add(id(root))
    if root is error and isinstance(error, MlflowException):
        return error.message
    return f"{type(root).__name__}: {root}" if str(root) else type(root).__name__


def end_run(status: str) -> None:
    """End the active run as `status`. A run that failed or was stopped is ended with one short
    try (a server that does not answer must not hold up a failing stage or Ctrl-C); if MLflow does
    not take the status, the run shows RUNNING until a rerun ends it, and a warning says so."""
    active = mlflow.active_run()
    if active is None:  # ended already, by the block itself
        return
    run_id = active.info.run_id
    handled = sys.exc_info()[1]  # the Ctrl-C or the error that ends the run, if any
    try:
        if status == "FINISHED":
            mlflow.end_run(status)
        else:
            with _last_request_bounds():
                mlflow.end_run(status)
    except MlflowException as error:  # end_run popped the run before asking the server
        logger.warning(
            "MLflow at %s did not take run %s's status %s (%s): it shows RUNNING until a rerun ends it",
            mlflow.get_tracking_uri(),
            run_id,
            status,
            failure_reason(error, handled),
        )


def check_tracking_server() -> None:
    """Fail within seconds if the tracking URI is a server that does not answer.

    MLflow's client retries with backoff; without this check a dead server would surface only
    after training, when the last metrics are logged.
    """
    uri = mlflow.get_tracking_uri()
    reason = _server_silence(uri)
    if reason is not None:
        raise PipelineError(
            f"the MLflow tracking server at {uri} (MLFLOW_TRACKING_URI) does not answer: {reason}. "
            "Start it, or unset MLFLOW_TRACKING_URI to log to ./mlflow.db"
        )


def wait_for_tracking_server(seconds: float = RESTART_GRACE_SECONDS) -> object | None:
    """Wait, up to `seconds`, until a tracking server that does not answer answers again (a
    restart); at once for a server that answers, or a local store. Why it still does not answer,
    or None."""
    uri = mlflow.get_tracking_uri()
    deadline = time.monotonic() + seconds
    silence = _server_silence(uri)
    if silence is None:
        return None
    logger.warning("MLflow at %s does not answer (%s): waiting up to %.0f s for it", uri, silence, seconds)
    while silence is not None and time.monotonic() < deadline:
        time.sleep(1)
        silence = _server_silence(uri)
    if silence is None:
        logger.info("MLflow at %s answers again", uri)
    return silence


def _server_silence(uri: str) -> object | None:
    """Why the tracking server at `uri` does not answer, or None if it does (or `uri` is not a
    server). It must answer its health check and a request that reads its database (its /health
    answers 200 while the database is down, and every other request 503); an answer 5xx is no
    answer, one 4xx (asking for credentials, refusing a user) is."""
    if urlparse(uri).scheme not in ("http", "https"):
        return None
    probes = {"/health": {}, DATABASE_PROBE: _authorization()}
    for path, headers in probes.items():
        request = urllib.request.Request(f"{uri.rstrip('/')}{path}", headers=headers)
        try:
            urllib.request.urlopen(request, timeout=SERVER_TIMEOUT_SECONDS).close()
        except urllib.error.HTTPError as error:
            if error.code >= 500:
                what = "its health check" if path == "/health" else "a request that reads its database"
                return f"HTTP {error.code} ({error.reason}) to {what}"
        except (urllib.error.URLError, OSError) as error:
            return getattr(error, "reason", error)
    return None


def _authorization() -> dict[str, str]:
    """The Authorization header MLflow's client sends, from the same variables, in its order."""
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}
    if os.environ.get("MLFLOW_TRACKING_TOKEN"):
        return {"Authorization": f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}"}
    return {}


def _recorded_run_id(path: Path) -> str | None:
    try:
        return read_run_file(path).run_id
    except PipelineError:
        return None


def _start_or_continue(experiment_name: str, run_name: str, interrupted_run_file: Path | None) -> mlflow.ActiveRun:
    # MLflow's own system metrics (CPU, memory, disk, network; GPU where present), sampled by a
    # thread of its own every MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL seconds (10): its *System
    # metrics* tab. With the server away it warns once and stops sampling; training goes on.
    if os.environ.get("MLFLOW_RUN_ID"):
        # `mlflow run` made the run in its own experiment; setting ours would conflict with it.
        return mlflow.start_run(log_system_metrics=True)
    interrupted = _recorded_run_id(interrupted_run_file) if interrupted_run_file else None
    if interrupted:
        try:
            run = mlflow.start_run(run_id=interrupted, log_system_metrics=True)
            logger.info("continuing the interrupted MLflow run %s", interrupted)
            return run
        except MlflowException as error:
            logger.warning("cannot continue MLflow run %s (%s): starting a new one", interrupted, error.message)
    set_experiment(experiment_name)
    return mlflow.start_run(run_name=run_name, log_system_metrics=True)


@contextlib.contextmanager
def start_pipeline_run(
    experiment_name: str, run_name: str, run_file: str | Path, interrupted_run_file: str | Path | None = None
) -> Iterator[RunRecord]:
    """Start the pipeline's run (or continue an interrupted one) and record it in `run_file`.

    `interrupted_run_file` is a file in the training's checkpoint folder: if it names a run, that
    run is continued, so an interrupted and resumed training is one MLflow run; the new run's id
    is written there at once. The block gets the run's record (run and experiment ids, tracking
    URI) and may add to it; `run_file` holds it. An exception inside the block ends the run as
    FAILED, an interrupt (Ctrl-C, SIGTERM) as KILLED; `run_file` is written only on success, so
    later stages never log into a failed run.
    """
    bound_http_requests()
    use_project_store()
    interrupted_run_file = Path(interrupted_run_file) if interrupted_run_file else None
    run = _start_or_continue(experiment_name, run_name, interrupted_run_file)
    with _ended(run):
        logger.info(
            "MLflow run %s in experiment %s at %s",
            run.info.run_id,
            run.info.experiment_id,
            mlflow.get_tracking_uri(),
        )
        record = RunRecord(
            run_id=run.info.run_id, experiment_id=run.info.experiment_id, tracking_uri=mlflow.get_tracking_uri()
        )
        if interrupted_run_file:
            write_run_file(interrupted_run_file, record)
        yield record
        write_run_file(run_file, record)


@contextlib.contextmanager
def _ended(run: mlflow.ActiveRun) -> Iterator[None]:
    """End the started `run` when the block ends: FINISHED, KILLED after Ctrl-C or SIGTERM (the
    stage was stopped, it did not fail; MLflow's own `with run` would say FAILED), else FAILED."""
    try:
        yield
    except KeyboardInterrupt:
        end_run("KILLED")
        raise
    except BaseException:
        end_run("FAILED")
        raise
    end_run("FINISHED")


@contextlib.contextmanager
def reopen_pipeline_run(run_file: str | Path) -> Iterator[RunRecord]:
    """Reopen the finished run that the train stage recorded in `run_file`, for a later stage to
    log into; the block gets the run file's record. The run ends FINISHED again, or FAILED on error;
    an MLflow error in the block (a server gone away) becomes a PipelineError saying to rerun."""
    use_project_store()
    recorded = read_run_file(run_file)
    run_id = recorded.run_id
    try:
        run = mlflow.start_run(run_id=run_id)
    except MlflowException as error:
        raise PipelineError(
            f"MLflow run {run_id} (from {run_file}, logged to {recorded.tracking_uri}) cannot be "
            f"reopened at {mlflow.get_tracking_uri()}: {error.message}"
        ) from None
    with _ended(run), _mlflow_errors_say_rerun(run_id):
        yield recorded


@contextlib.contextmanager
def start_evaluation_run(run_file: str | Path, run_name: str) -> Iterator[mlflow.ActiveRun]:
    """Start a new run nested under the training run that `run_file` names: one evaluation's
    params, metrics and logged model, never confused with another evaluation's of the same
    training. It ends FINISHED, KILLED after Ctrl-C, or FAILED; an MLflow error in the block
    becomes a PipelineError saying to rerun."""
    use_project_store()
    recorded = read_run_file(run_file)
    parent = recorded.run_id
    # Under `mlflow run`, MLFLOW_RUN_ID names the project's run (the parent): MLflow would
    # resume it instead of starting the child.
    os.environ.pop("MLFLOW_RUN_ID", None)
    try:
        run = mlflow.start_run(experiment_id=recorded.experiment_id, run_name=run_name, parent_run_id=parent)
    except MlflowException as error:
        raise PipelineError(
            f"MLflow run {parent} (from {run_file}, logged to {recorded.tracking_uri}) cannot take an "
            f"evaluation at {mlflow.get_tracking_uri()}: {error.message}"
        ) from None
    with _ended(run), _mlflow_errors_say_rerun(run.info.run_id):
        yield run


@contextlib.contextmanager
def _mlflow_errors_say_rerun(run_id: str) -> Iterator[None]:
    try:
        yield
    except MlflowException as error:  # the server, or its artifact store, went away during the stage
        raise PipelineError(
            f"MLflow at {mlflow.get_tracking_uri()} did not take this stage's results "
            f"({failure_reason(error)}): rerun the stage (`dvc repro`) once it answers, to log them "
            f"into run {run_id}"
        ) from None


def default_run_name(params: Params) -> str:
    """A run name that says what differs between runs; under `dvc exp run`, the experiment's name."""
    experiment = os.environ.get("DVC_EXP_NAME")
    if experiment:
        return experiment
    train = params.train
    return (
        f"{train.optimizer}-lr{train.peak_learning_rate:g}-b{train.batch_size}-e{train.epochs}"
        f"-{params.preprocess.normalization}"
    )


def archive_dataset(url: str, archive_md5: str) -> MetaDataset:
    """The data set as MLflow shows it (the runs table's Dataset column, a logged model's
    "Datasets used"): the archive, by its md5 and where it came from."""
    with warnings.catch_warnings():  # MLflow warns that a local path could be two kinds of source
        warnings.simplefilter("ignore", UserWarning)
        source = dataset_source_registry.resolve_dataset_source(url)
    return MetaDataset(source=source, name="cifar-10", digest=archive_md5)


def log_run_inputs(
    params: Params,
    params_file: str | Path,
    description: DatasetDescription,
    prepared_md5: str,
    derived: Mapping | None = None,
) -> None:
    """Into the active run: every param, the `derived` values (as `derived.<key>` params), the
    data set (name, the archive's md5, its URL), the provenance tags, and as artifacts the params
    file, dvc.lock (if any), the installed packages, `description` (dataset.json) and, from a
    tree with uncommitted changes, their diff and the untracked files' names."""
    # The rate actually used, after lr_batch_scaling: the one to compare across batch sizes.
    derived = {"peak_learning_rate": params.train.peak_learning_rate, **(derived or {})}
    # evaluate.* belong to each evaluation's own run (start_evaluation_run), not to the training.
    training_params = {key: value for key, value in params.flat().items() if not key.startswith(EVALUATE_PREFIX)}
    mlflow.log_params(training_params | {f"derived.{key}": value for key, value in derived.items()})
    data_tags = {
        "data.archive_md5": description.archive_md5,
        "data.prepared_md5": prepared_md5,
        "data.sizes": json.dumps(description.sizes),
    }
    mlflow.set_tags(provenance_tags() | data_tags)
    mlflow.log_input(archive_dataset(params.fetch.url, description.archive_md5), context="training")
    mlflow.log_artifact(str(params_file), artifact_path="provenance")
    if Path("dvc.lock").exists():  # the upstream stages' data and code hashes, as of this run
        mlflow.log_artifact("dvc.lock", artifact_path="provenance")
    mlflow.log_text(installed_packages(), "provenance/packages.txt")
    _log_uncommitted_changes()
    # Class names, split sizes, the normalization and its statistics: what the data was.
    mlflow.log_dict(description.as_written(), "provenance/dataset.json")


def main(argv: list[str] | None = None) -> None:
    """`python -m alexnet8.tracking --ui-url BASE`: print where `make ui`'s runs table is."""
    import argparse

    from alexnet8.params import load_params

    parser = argparse.ArgumentParser(prog="python -m alexnet8.tracking", description=main.__doc__)
    parser.add_argument("--ui-url", required=True, help="the UI's base address, e.g. http://127.0.0.1:5000")
    parser.add_argument("--params", default="params.yaml", help="params file naming the experiment")
    arguments = parser.parse_args(argv)
    use_project_store()
    url = runs_page_url(arguments.ui_url.rstrip("/"), load_params(arguments.params).mlflow.experiment_name)
    print(f"MLflow UI: {url}", flush=True)


if __name__ == "__main__":
    main()
