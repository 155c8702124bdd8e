"""Process-wide TensorFlow settings for training: numerics, determinism, XLA and the devices it runs on.

Reads: `/proc/cpuinfo` (the CPU's model and features, for `train.jit_compile: auto` and the
training run's machine tags). Writes nothing.
"""

from __future__ import annotations

import logging
import os
import platform
from pathlib import Path

import keras
import tensorflow as tf

from alexnet8.params import TrainParams

logger = logging.getLogger(__name__)


def cpu_features(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU's feature flags as Linux names them (`avx2`, `avx512f`, ...); empty where unknown."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def cpu_model(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """The CPU's model name (`Intel(R) Xeon(R) ...`), or the platform's word for it where Linux's is unknown."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            return value.strip()
    return platform.processor() or platform.machine() or "unknown"


# The CPU features that decide which kernels oneDNN, XLA and Eigen pick (vector width, FMA,
# bfloat16): two CPUs alike in these run the same arithmetic in the same order.
KERNEL_FEATURES = frozenset(
    {
        "sse4_2",
        "avx",
        "avx2",
        "fma",
        "avx512f",
        "avx512bw",
        "avx512_vnni",
        "avx512_bf16",
        "avx512_fp16",
        "amx_bf16",
        "amx_tile",
    }
)


def machine_facts() -> dict[str, str]:
    """What decides whether training elsewhere gives bit-identical weights, as the training run's
    tags (reproduce.py compares them): the CPU's model and kernel features, the threads
    TensorFlow's ops use, the GPUs. Precision and the resolved `jit_compile` are params."""
    gpus = tf.config.list_physical_devices("GPU")
    names = [tf.config.experimental.get_device_details(gpu).get("device_name", gpu.name) for gpu in gpus]
    # 0 means TensorFlow's default: one thread per CPU this process may run on.
    threads = tf.config.threading.get_intra_op_parallelism_threads() or len(os.sched_getaffinity(0))
    return {
        "machine.cpu": cpu_model(),
        "machine.cpu_features": " ".join(sorted(KERNEL_FEATURES & cpu_features())),
        "machine.cpu_count": str(os.cpu_count()),
        "machine.threads": str(threads),
        "machine.gpus": ", ".join(names) or "none",
    }


def xla_choice(setting: bool | str, features: frozenset[str], has_gpu: bool, multi_worker: bool = False) -> bool | str:
    """What `train.jit_compile` means on this machine: `auto` is XLA on CPUs with AVX2 but not
    AVX-512, off on CPUs with AVX-512, and Keras' own `auto` (XLA on a GPU) when there is a GPU.
    On CPUs, a multi-worker training never uses XLA: XLA has no collectives for CPU devices
    (TensorFlow 2.21: "Collectives are not yet implemented for CPU devices when compiling with XLA").

    Measured side by side with the original script (docs/performance.md): on a 2-core AVX2 CPU
    XLA trained at 1.06-1.10x, on a 2-core AVX-512 CPU at 0.79x, where oneDNN's AVX-512
    convolutions (used without XLA) beat XLA's. The choice depends only on the CPU's features,
    never on timing, so a rerun on the same machine makes the same choice and the same weights.
    """
    if setting != "auto":
        return setting
    if has_gpu:
        return "auto"
    return "avx2" in features and "avx512f" not in features and not multi_worker


def configure_runtime(params: TrainParams, multi_worker: bool = False) -> TrainParams:
    """Apply the params' precision and determinism; call before building the model. Returns the
    params with `jit_compile` resolved for this machine (see xla_choice)."""
    if params.deterministic:
        # Same seed, data and machine -> bit-identical weights (see docs, "Reproducibility").
        tf.config.experimental.enable_op_determinism()
    keras.mixed_precision.set_global_policy(params.precision)
    has_gpu = bool(tf.config.list_physical_devices("GPU"))
    jit_compile = xla_choice(params.jit_compile, cpu_features(), has_gpu, multi_worker)
    if params.jit_compile == "auto":
        logger.info("train.jit_compile: auto -> %s on this machine", jit_compile)
    return params.model_copy(update={"jit_compile": jit_compile})


def distribution_strategy() -> tf.distribute.Strategy:
    """Mirror over all GPUs when there are several; otherwise TensorFlow's default (one device)."""
    gpus = tf.config.list_logical_devices("GPU")
    if len(gpus) > 1:
        logger.info("training on %d GPUs with MirroredStrategy", len(gpus))
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()
