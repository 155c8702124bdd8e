"""`make train-ray WORKERS=N`: the train stage as N Ray Train workers (Ray's TensorflowTrainer).

`python -m alexnet8.ray_training --workers N [--storage-path PATH]` runs on the Ray cluster at
`RAY_ADDRESS`, or on a local one it starts and stops when that is unset. Ray gives every worker
its `TF_CONFIG`, and each runs dvc.yaml's train command through `python -m alexnet8`'s own entry,
in a folder of its own laid out like the project: params.yaml, dvc.lock and the training and
validation splits, sent through Ray's object store (no node needs a copy of data/prepared).
Rank 0 is the chief (multi_worker.py): it logs the MLflow run and writes the outputs, which come
back through Ray's checkpoint in the storage path to this project, wherever rank 0 ran; then the
git provenance is added to the run and `dvc commit -f train` records the outputs.

The chief's epoch checkpoints (checkpoints.py) go under the storage path, which every node must
reach as a file system at the same path: a worker lost mid-run makes Ray restart all of them
(up to --max-failures times), and they resume after the last finished epoch, in the same MLflow
run. The MLflow and AWS variables (tracking URI, user, password, S3 keys) reach the workers as
an object in the object store, never in a runtime environment, which Ray's dashboard and state
API show.

Reads: dvc.yaml, params.yaml, dvc.lock, data/prepared, `RAY_ADDRESS`, `MLFLOW_*`, `AWS_*`.
Writes: the train stage's outputs (dvc.yaml's paths), dvc.lock, and under the storage path
(default: checkpoints/ray) `alexnet8-train-<key>/`, deleted once the outputs are here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from alexnet8 import cli
from alexnet8.dataset import DATASET_FILE, image_file, label_file
from alexnet8.errors import PipelineError
from alexnet8.files import atomic_path

logger = logging.getLogger(__name__)

OUTPUT_OPTIONS = ("--model", "--history", "--metrics", "--run-file")  # what rank 0 sends back
FORWARDED_PREFIXES = ("MLFLOW_", "AWS_", "ALEXNET8_")  # the variables every worker gets
RUN_PREFIX = "alexnet8-train-"
DEFAULT_STORAGE = "checkpoints/ray"  # with the train stage's own checkpoints: `make clean` removes both
MAX_FAILURES = 3


class StageFailed(RuntimeError):
    """The train stage exited with an error on this worker (its message is in the lines before)."""


def stage_options(command: Sequence[str]) -> dict[str, str]:
    """The `--option value` pairs of dvc.yaml's train command (`python -m alexnet8 train ...`)."""
    arguments = list(command[command.index("train") + 1 :])
    if len(arguments) % 2 or not all(option.startswith("--") for option in arguments[::2]):
        raise PipelineError(f"dvc.yaml's train command is not `python -m alexnet8 train --option value ...`: {command}")
    return dict(zip(arguments[::2], arguments[1::2], strict=True))


def worker_argv(options: Mapping[str, str], checkpoints: str) -> list[str]:
    """`python -m alexnet8`'s arguments on a worker: dvc.yaml's, relative to the worker's folder,
    with the checkpoints in the storage path that all workers share."""
    argv = ["train"]
    for option, value in (options | {"--checkpoints": checkpoints}).items():
        argv += [option, value]
    return argv


def workspace_files(root: Path, prepared: str) -> list[str]:
    """What the train stage reads, relative to the project: params.yaml, dvc.lock (logged with
    the run, if any), and of the prepared data the training and validation splits."""
    data = [f"{prepared}/{DATASET_FILE}"] + [
        f"{prepared}/{name(split)}" for split in ("train", "validation") for name in (image_file, label_file)
    ]
    missing = [path for path in data if not (root / path).is_file()]
    if missing:
        raise PipelineError(f"{', '.join(missing)} not found: run `dvc repro preprocess` first")
    return ["params.yaml", *(["dvc.lock"] if (root / "dvc.lock").is_file() else []), *data]


def read_workspace(root: Path, files: Sequence[str]) -> dict[str, np.ndarray]:
    """The files' bytes, as arrays: Ray's object store holds them once per node, and a worker
    reads them without a copy."""
    return {path: np.fromfile(root / path, dtype=np.uint8) for path in files}


def write_workspace(files: Mapping[str, np.ndarray], folder: Path) -> int:
    """Lay the files out under `folder`; the bytes written."""
    for relative, content in files.items():
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_bytes(memoryview(content))
    return sum(content.nbytes for content in files.values())


def forwarded_environment(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The variables of FORWARDED_PREFIXES: where MLflow is, how to log in, the S3 keys."""
    return {name: value for name, value in environ.items() if name.startswith(FORWARDED_PREFIXES)}


def run_key(root: Path, prepared: str, workers: int) -> str:
    """The checkpoints' training key (the train params, the seed and the prepared data's
    description), naming the Ray run: a rerun with the same ones resumes it, others start their
    own. Bad params, or a batch that does not split over the workers, fail here, before any
    worker starts."""
    from alexnet8.checkpoints import training_key
    from alexnet8.dataset import load_description
    from alexnet8.multi_worker import check_last_batch, per_worker_batch_size
    from alexnet8.params import load_params

    params = load_params(root / "params.yaml")
    description = load_description(root / prepared)
    per_worker_batch_size(params.train.batch_size, workers)
    check_last_batch(description.sizes["train"], params.train.batch_size, workers)
    return training_key(params, description)


def run_stage(argv: Sequence[str]) -> None:
    """`python -m alexnet8 <argv>` in this process; StageFailed if it exits with an error."""
    from alexnet8.__main__ import main

    try:
        main(list(argv))
    except SystemExit as stop:
        if stop.code:
            raise StageFailed(f"the train stage exited with code {stop.code} (its error is logged above)") from None


def train_worker(config: dict) -> None:
    """One Ray Train worker: the train stage in a folder of its own, with Ray's TF_CONFIG."""
    import ray
    import ray.train

    # In this process only: the object's content never shows in Ray's state or logs.
    forwarded = ray.get(config["environment"])
    os.environ.update(forwarded)
    rank = ray.train.get_context().get_world_rank()
    if ray.train.get_checkpoint() is not None:
        logger.info("rank %d: the training finished before the restart; its outputs are in Ray's checkpoint", rank)
        return
    # Named by the run and rank: a restarted worker first removes what a killed one left here.
    folder = Path(tempfile.gettempdir(), f"alexnet8-ray-{config['key']}-{rank}")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    try:
        started = time.monotonic()
        size = write_workspace(ray.get(config["workspace"]), folder)
        logger.info(
            "rank %d of %d (pid %d, node %s): %.1f MB of params and data received in %.1f s; %s from the driver",
            rank,
            ray.train.get_context().get_world_size(),
            os.getpid(),
            ray.util.get_node_ip_address(),
            size / 1e6,
            time.monotonic() - started,
            ", ".join(sorted(forwarded)) or "no variables",
        )
        with contextlib.chdir(folder):  # the stage reads and writes dvc.yaml's relative paths here
            run_stage(config["argv"])
        checkpoint = None
        if rank == 0:
            for relative in config["outputs"]:
                (folder / "outputs" / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(folder / relative, folder / "outputs" / relative)
            checkpoint = ray.train.Checkpoint.from_directory(folder / "outputs")
        ray.train.report({"rank": rank}, checkpoint=checkpoint)  # every worker reports: a barrier
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def ray_cluster(address: str | None, hidden: Mapping[str, str]) -> Iterator[None]:
    """Connected to the cluster at `address`, or to a new local one (stopped at the end) without
    the `hidden` variables in its processes' environment."""
    import ray

    if address:
        ray.init(address=address)
    else:
        for name in hidden:
            os.environ.pop(name, None)
        try:
            ray.init(address="local")
        finally:
            os.environ.update(hidden)
    try:
        yield
    finally:
        ray.shutdown()


def fit(workers: int, storage: Path, key: str, config: dict, max_failures: int):
    """Run the Ray Train job; its result (whose checkpoint holds rank 0's outputs)."""
    import ray.train
    from ray.train.tensorflow import TensorflowTrainer

    trainer = TensorflowTrainer(
        train_worker,
        train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=False),
        run_config=ray.train.RunConfig(
            name=RUN_PREFIX + key,
            storage_path=str(storage),
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
        ),
    )
    try:
        return trainer.fit()
    except ray.train.TrainingFailedError as error:
        raise PipelineError(
            f"the Ray Train job failed after {max_failures} restart(s) ({error}): run it again to resume "
            f"after the last finished epoch (its state is in {storage / (RUN_PREFIX + key)})"
        ) from None


def copy_outputs(result_folder: Path, root: Path, outputs: Sequence[str]) -> None:
    """Rank 0's outputs into the project, each replaced whole."""
    for relative in outputs:
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(root / relative) as temporary:
            shutil.copyfile(result_folder / relative, temporary)
        logger.info("wrote %s", relative)


def log_provenance(run_file: Path) -> None:
    """What the chief could not see from its folder: this checkout's git commit, its uncommitted
    changes and the command, as the train stage logs them on one machine. A tracking server
    that does not take them is a warning: the model and its run are complete without them."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from alexnet8 import tracking
    from alexnet8.run_record import read_run_file

    run_id = read_run_file(run_file).run_id
    client = mlflow.MlflowClient()
    diff, untracked = tracking.uncommitted_changes()
    try:
        for name, value in tracking.provenance_tags().items():
            client.set_tag(run_id, name, value)
        if diff:
            with tempfile.TemporaryDirectory(prefix="alexnet8-") as folder:
                (Path(folder) / tracking.UNCOMMITTED_DIFF).write_bytes(diff)
                client.log_artifact(run_id, str(Path(folder) / tracking.UNCOMMITTED_DIFF), "provenance")
        if untracked:
            client.log_text(run_id, untracked, f"provenance/{tracking.UNTRACKED_FILES}")
    except MlflowException as error:
        logger.warning("MLflow did not take run %s's git provenance (%s)", run_id, tracking.failure_reason(error))


def prepare_tracking(root: Path) -> None:
    """A tracking server that does not answer fails here, not after Ray's restarts. Without
    MLFLOW_TRACKING_URI: the project's own store, its experiment made here, so that the workers
    log into it (as a path: every node must reach it) with its artifacts in mlruns/."""
    from alexnet8 import tracking
    from alexnet8.params import load_params

    if os.environ.get("MLFLOW_TRACKING_URI"):
        tracking.check_tracking_server()
        return

    tracking.use_project_store()  # sets MLFLOW_TRACKING_URI
    tracking.set_experiment(load_params(root / "params.yaml").mlflow.experiment_name)
    if os.environ.get("RAY_ADDRESS"):
        logger.warning(
            "MLFLOW_TRACKING_URI is unset: the workers log to %s, which every node must reach; "
            "set it to a tracking server otherwise",
            os.environ["MLFLOW_TRACKING_URI"],
        )


def train_on_ray(root: Path, workers: int, storage: Path, max_failures: int) -> None:
    """The whole job: ship, train, bring the outputs back, log provenance, `dvc commit -f train`."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # read when Ray loads: every worker's lines, not "[repeated 2x]"
    from alexnet8.tensorflow_startup import load_tensorflow

    load_tensorflow()  # which the launcher's module and Ray's TensorflowTrainer import: without its noise
    import ray

    from alexnet8.launch_workers import train_stage_command

    options = stage_options(train_stage_command(root / "dvc.yaml"))
    files = workspace_files(root, options["--data"])
    key = run_key(root, options["--data"], workers)
    secrets = forwarded_environment()  # not MLFLOW_EXPERIMENT_ID, which prepare_tracking may set
    prepare_tracking(root)
    secrets["MLFLOW_TRACKING_URI"] = os.environ["MLFLOW_TRACKING_URI"]
    run_folder = storage / (RUN_PREFIX + key)
    outputs = [options[option] for option in OUTPUT_OPTIONS]
    with ray_cluster(os.environ.get("RAY_ADDRESS"), secrets):
        started = time.monotonic()
        workspace = read_workspace(root, files)
        config = {
            "workspace": ray.put(workspace),
            "environment": ray.put(secrets),
            "argv": worker_argv(options, str(run_folder / "checkpoints")),
            "key": key,
            "outputs": outputs,
        }
        logger.info(
            "%.1f MB of params and data in Ray's object store in %.1f s",
            sum(content.nbytes for content in workspace.values()) / 1e6,
            time.monotonic() - started,
        )
        del workspace
        result = fit(workers, storage, key, config, max_failures)
        with result.checkpoint.as_directory() as folder:
            copy_outputs(Path(folder), root, outputs)
    shutil.rmtree(run_folder, ignore_errors=True)
    log_provenance(root / options["--run-file"])
    committed = subprocess.run([sys.executable, "-m", "dvc", "commit", "--force", "train"], cwd=root)
    if committed.returncode:
        raise PipelineError("the outputs are written, but `dvc commit -f train` failed (above): run it again")
    logger.info("dvc.lock records the outputs: `dvc repro` runs evaluate and plot")


def main(argv: Sequence[str] | None = None) -> None:
    argument_parser = cli.parser(__doc__.splitlines()[0], reads_params=False)
    argument_parser.add_argument("--workers", type=int, default=2, help="number of Ray Train workers (default: 2)")
    argument_parser.add_argument(
        "--storage-path",
        default=DEFAULT_STORAGE,
        help=f"Ray's storage path, reached by every node at the same path (default: {DEFAULT_STORAGE})",
    )
    argument_parser.add_argument(
        "--max-failures", type=int, default=MAX_FAILURES, help=f"restarts after a failure (default: {MAX_FAILURES})"
    )
    arguments = argument_parser.parse_args(argv)
    if arguments.workers < 1:
        raise PipelineError(f"--workers must be at least 1, got {arguments.workers}")
    if os.environ.get("RAY_ADDRESS") and arguments.storage_path == DEFAULT_STORAGE:
        logger.warning("every node must reach the storage path %s at that path (--storage-path)", DEFAULT_STORAGE)
    root = Path.cwd()
    train_on_ray(root, arguments.workers, (root / arguments.storage_path).resolve(), arguments.max_failures)


if __name__ == "__main__":
    cli.run(main)
