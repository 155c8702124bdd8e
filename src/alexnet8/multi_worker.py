"""Training on several machines with TensorFlow's MultiWorkerMirroredStrategy, configured by `TF_CONFIG`.

Reads: the `TF_CONFIG` environment variable (set by hand, by `python -m alexnet8.launch_workers`, by a
Kubernetes TFJob or by Ray Train). Writes nothing.

Every worker runs the same train stage command. Each step's global batch is `train.batch_size`
images: worker k of n reads and trains on rows k, k + n, k + 2n, ... of it (batch_size / n
images), the gradients are summed across workers (an all-reduce over gRPC), and every worker
applies the same update, so all hold the same weights. The chief (the `chief` task, or worker 0
when there is none) alone logs to MLflow and writes the stage's outputs and the checkpoint.

Keras 3's `fit` does not run under this strategy as it comes (keras-team/keras#20585,
tensorflow/tensorflow#72388); `prepare_for_fit` applies the two work-arounds that make it run.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from alexnet8 import library_patches
from alexnet8.checkpoints import completed_epochs
from alexnet8.errors import PipelineError
from alexnet8.runtime import distribution_strategy

logger = logging.getLogger(__name__)

TF_CONFIG = "TF_CONFIG"
TRAINING_JOBS = ("chief", "worker")  # the tasks that train; MultiWorkerMirroredStrategy has no others
WORKERS_TAG = "train.workers"  # the MLflow tag with the number of workers of the run

# A worker that waits longer than this in one all-reduce (a peer died, hangs or is unreachable)
# fails with DeadlineExceeded instead of waiting forever. It bounds one training step, and the
# first step also waits for every worker to start: slow storage or a slow MLflow server at start
# needs more (ALEXNET8_COLLECTIVE_TIMEOUT, seconds).
COLLECTIVE_TIMEOUT_SECONDS = 300
# A worker that sends no heartbeat to the coordination service (on the chief) for this long is
# declared dead, and the error is propagated to every other worker within about as long.
HEARTBEAT_TIMEOUT_SECONDS = 20
# How long the workers wait for all of them to have started and registered.
REGISTER_TIMEOUT_SECONDS = 300

# Added (times the worker's rank) to the dropout layers' seed on every worker but the chief, so
# that workers draw different dropout masks for their shares of a batch.
_DROPOUT_SEED_STRIDE = 1_000_003


@dataclass(frozen=True)
class Cluster:
    """This process's place in a multi-worker training: `workers` tasks in all, `rank` 0 is the chief."""

    workers: int
    rank: int
    task: str  # as TF_CONFIG names it, e.g. "worker:1"

    @property
    def is_chief(self) -> bool:
        return self.rank == 0


def _config_error(problem: str) -> PipelineError:
    return PipelineError(
        f"{TF_CONFIG} {problem}. Expected JSON like "
        '{"cluster": {"worker": ["host1:port", "host2:port"]}, "task": {"type": "worker", "index": 0}} '
        "(see docs/scaling.md); unset it to train on this machine alone"
    )


def cluster_from_environment(environ: Mapping[str, str] = os.environ) -> Cluster | None:
    """This process's place in the cluster that `TF_CONFIG` describes; None when it is unset or
    empty. Raises PipelineError naming what is wrong with it."""
    text = environ.get(TF_CONFIG, "").strip()
    if not text:
        return None
    try:
        config = json.loads(text)
    except ValueError as error:
        raise _config_error(f"is not valid JSON ({error})") from None
    if not isinstance(config, dict) or not isinstance(config.get("cluster"), dict):
        raise _config_error('has no "cluster" mapping')
    cluster = config["cluster"]
    others = sorted(set(cluster) - set(TRAINING_JOBS))
    if others:
        raise _config_error(
            f"names the job(s) {', '.join(others)}: MultiWorkerMirroredStrategy trains with "
            "chief and worker tasks only (no parameter servers or evaluators)"
        )
    for job, addresses in cluster.items():
        if not isinstance(addresses, list) or not addresses or not all(isinstance(a, str) for a in addresses):
            raise _config_error(f'has cluster.{job} = {addresses!r}, not a list of "host:port" addresses')
    if len(cluster.get("chief", [])) > 1:
        raise _config_error(f"lists {len(cluster['chief'])} chiefs; there can be one")
    task = config.get("task")
    if not isinstance(task, dict) or task.get("type") not in cluster:
        raise _config_error(f'has task = {task!r}: its "type" must be one of {", ".join(sorted(cluster))}')
    index = task.get("index")
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(cluster[task["type"]]):
        raise _config_error(
            f"has task.index = {index!r}: cluster.{task['type']} has {len(cluster[task['type']])} "
            f"address(es), so it must be 0 to {len(cluster[task['type']]) - 1}"
        )
    has_chief = "chief" in cluster
    rank = 0 if task["type"] == "chief" else index + int(has_chief)
    workers = len(cluster.get("chief", [])) + len(cluster.get("worker", []))
    return Cluster(workers=workers, rank=rank, task=f"{task['type']}:{index}")


def per_worker_batch_size(batch_size: int, workers: int) -> int:
    """Each worker's share of the global batch `batch_size`. Raises PipelineError unless it divides evenly."""
    if batch_size % workers:
        raise PipelineError(
            f"train.batch_size = {batch_size} is the global batch, split evenly over the {workers} workers: "
            f"it must be a multiple of {workers} (e.g. {batch_size - batch_size % workers or workers} "
            f"or {batch_size - batch_size % workers + workers})"
        )
    return batch_size // workers


def check_last_batch(examples: int, batch_size: int, workers: int) -> None:
    """Every worker must have at least one image in each step, the last, partial one of an epoch
    included (an empty share would give NaN batch statistics). Raises PipelineError otherwise."""
    last = examples % batch_size
    if 0 < last < workers:
        raise PipelineError(
            f"the training split's {examples} images make a last batch of {last} per epoch with "
            f"train.batch_size = {batch_size}, fewer than the {workers} workers: choose a batch size "
            "that leaves at least one image per worker in the last batch"
        )


def create_strategy(cluster: Cluster) -> tf.distribute.MultiWorkerMirroredStrategy:
    """The strategy for this worker, with bounded waits for peers; call before any other TensorFlow op
    (it starts this process's gRPC server and fixes its devices). Blocks until all workers started."""
    library_patches.TENSORFLOW_COORDINATION_SERVICE.check()  # private API, below
    from tensorflow.compiler.xla.tsl.protobuf import coordination_config_pb2
    from tensorflow.python.eager import context

    tf_config = json.loads(os.environ[TF_CONFIG])
    jobs = [job for job in TRAINING_JOBS if job in tf_config["cluster"]]
    # What MultiWorkerMirroredStrategy configures itself, with bounds instead of its defaults: a
    # dead peer is detected by the coordination service's heartbeats (the strategy's own health
    # check thread is off whenever the service runs).
    context.context().configure_coordination_service(
        service_type="standalone",
        service_leader=f"/job:{jobs[0]}/replica:0/task:0",
        heartbeat_timeout_in_ms=HEARTBEAT_TIMEOUT_SECONDS * 1000,
        cluster_register_timeout_in_ms=REGISTER_TIMEOUT_SECONDS * 1000,
        coordinated_jobs=[
            coordination_config_pb2.CoordinatedJob(name=job, num_tasks=len(tf_config["cluster"][job])) for job in jobs
        ],
    )
    # TensorFlow logs every all-reduce it builds at INFO; its warnings and errors still show.
    logging.getLogger("tensorflow").setLevel(logging.WARNING)
    timeout = float(os.environ.get("ALEXNET8_COLLECTIVE_TIMEOUT", COLLECTIVE_TIMEOUT_SECONDS))
    logger.info(
        "joining %d workers as %s (rank %d%s); waiting for all of them",
        cluster.workers,
        cluster.task,
        cluster.rank,
        ", the chief" if cluster.is_chief else "",
    )
    strategy = tf.distribute.MultiWorkerMirroredStrategy(
        communication_options=tf.distribute.experimental.CommunicationOptions(timeout_seconds=timeout)
    )
    if strategy.num_replicas_in_sync != cluster.workers:
        raise PipelineError(
            f"{cluster.workers} workers in {TF_CONFIG} but {strategy.num_replicas_in_sync} replicas: "
            "multi-worker training here expects one device per worker (no GPUs or a single GPU each)"
        )
    return strategy


@dataclass(frozen=True)
class Worker:
    """Where this process trains: alone (`cluster` None, with this machine's strategy), or as one
    worker of a joined cluster. What training does differently in a cluster, it asks of this."""

    strategy: tf.distribute.Strategy
    cluster: Cluster | None = None

    @property
    def is_chief(self) -> bool:
        return self.cluster is None or self.cluster.is_chief

    @property
    def workers(self) -> int:
        return self.cluster.workers if self.cluster else 1

    @property
    def rank(self) -> int:
        return self.cluster.rank if self.cluster else 0

    def distribute(self, dataset: tf.data.Dataset) -> tf.data.Dataset | tf.distribute.DistributedDataset:
        """The dataset as `fit` takes it: as it is alone; in a cluster, as the strategy's input, with
        no automatic sharding or rebatching, since it already reads only this worker's share of
        each global batch."""
        if self.cluster is None:
            return dataset
        return self.strategy.distribute_datasets_from_function(lambda input_context: dataset)

    def prepare_model(self, model: keras.Model, first_epoch: int, epochs: int, element_spec) -> None:
        """In a cluster: check that all workers resume from `first_epoch`, and make `fit` run
        (prepare_for_fit, for input of `element_spec`). Nothing alone."""
        if self.cluster is not None:
            self.agree_on_epoch(first_epoch, epochs)
            prepare_for_fit(model, self.strategy, element_spec)

    def failures_explained(self, checkpoint_dir: str | Path) -> contextlib.AbstractContextManager:
        """In a cluster, peer_failures_explained: a dead or unreachable peer fails this worker with a
        message saying how to resume."""
        return peer_failures_explained(checkpoint_dir) if self.cluster else contextlib.nullcontext()

    def agree_on_epoch(self, first_epoch: int, epochs: int) -> None:
        """Fail on every worker unless all of them resume from the same epoch (from the same checkpoint)."""
        counts = self.strategy.reduce(
            tf.distribute.ReduceOp.SUM,
            self.strategy.run(lambda: tf.one_hot(first_epoch, epochs + 1, dtype=tf.int32)),
            axis=None,
        )
        epochs_found = {epoch: int(count) for epoch, count in enumerate(np.asarray(counts)) if count}
        if len(epochs_found) > 1:
            raise PipelineError(
                f"the workers would resume from different epochs ({epochs_found}: epoch -> workers): "
                "every worker must see the chief's --checkpoints folder (one machine, or a shared "
                "file system); delete it on all machines to start over"
            )


@contextlib.contextmanager
def peer_failures_explained(checkpoint_dir: str | Path) -> Iterator[None]:
    """Turn the errors a dead, hung or unreachable peer causes in this worker into one message
    that says what happened and how to resume."""
    try:
        yield
    except tf.errors.OpError as error:
        # The first line says what happened, after the name of the graph node it happened in.
        lines = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", error.message or "").strip().splitlines()
        raise PipelineError(
            "a worker of the multi-worker training stopped or cannot be reached "
            f"({type(error).__name__}: {lines[0] if lines else 'no message'}): "
            f"run all the workers again to resume after epoch {completed_epochs(checkpoint_dir)}"
        ) from None


def join_cluster(batch_size: int) -> Worker:
    """With `TF_CONFIG` set, join the cluster it describes (checking first that `batch_size`
    splits over its workers); without it, train alone. Call before any other TensorFlow op."""
    cluster = cluster_from_environment()
    if cluster is None:
        return Worker(distribution_strategy())
    per_worker_batch_size(batch_size, cluster.workers)
    return Worker(create_strategy(cluster), cluster)


def _metrics_as_vectors(step: Callable) -> Callable:
    @functools.wraps(step)
    def step_with_vector_metrics(data):
        return {name: tf.reshape(value, [1]) for name, value in step(data).items()}

    return step_with_vector_metrics


def prepare_for_fit(model: keras.Model, strategy: tf.distribute.Strategy, element_spec) -> None:
    """Make Keras 3's `fit` and `evaluate` run under MultiWorkerMirroredStrategy (Keras 3.15).

    1. `fit` first reduces a whole input batch with `strategy.reduce("MEAN", (x, y))` to build the
       model's metrics, which fails under this strategy (`ValueError: Attempt to convert a value
       (PerReplica:...)`, keras-team/keras#20585), and consumes a batch while doing so. The model
       is built here from the input's shapes instead, and that step is skipped.
    2. Each step's metrics are reduced across workers with `strategy.reduce("MEAN", value,
       axis=0)`, which fails for scalars (`Invalid reduction dimension 0 for input with 0
       dimensions`, tensorflow/tensorflow#72388). Returning them as 1-element vectors makes that
       the mean over workers.
    """
    library_patches.KERAS_FIT_UNDER_MULTI_WORKER.check()
    with strategy.scope():
        model._symbolic_build(data_batch=element_spec)
    model._maybe_symbolic_build = lambda iterator=None, data_batch=None: None
    model.train_step = _metrics_as_vectors(model.train_step)
    model.test_step = _metrics_as_vectors(model.test_step)


def offset_dropout_seeds(model: keras.Model, rank: int) -> None:
    """Offset the dropout layers' seed by the worker's rank (the chief's, rank 0, stays as it is), so
    the workers draw different masks, and a resumed run, which restores the chief's random state
    first, draws the same as an uninterrupted one."""
    if not rank:
        return
    for layer in model.layers:
        if hasattr(layer, "seed_generator"):
            state = np.asarray(layer.seed_generator.state).copy()
            state[0] = (int(state[0]) + rank * _DROPOUT_SEED_STRIDE) % 2**32
            layer.seed_generator.state.assign(state)
