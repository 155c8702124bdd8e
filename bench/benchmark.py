#!/usr/bin/env python3
"""Training throughput and peak memory: this pipeline's trainer against a reference script, side by side.

Usage:
  python bench/benchmark.py ARCHIVE --reference ORIGINAL_SCRIPT [--train-images N] [--rounds R]
         [--config NAME=key=value,key=value ...] [--intended-reference]

ARCHIVE is a CIFAR-10 binary tar.gz; ORIGINAL_SCRIPT a script that takes `ARCHIVE --train-images N
--epochs 1` and prints `train_images_per_second <float>` (the original AlexNet8 script as
written, given as an argument). The archive is preprocessed once (the
preprocess stage at params.yaml's values). Then, for each round, the reference and each of our
configurations run one after the other, each in its own process, on the same number of training
images (N, batch size from params.yaml: same steps), so that machine noise hits all alike. Ours
reads the training split from its .npy file batch by batch, as the train stage does, for N /
batch steps.

Throughput counts as the reference does: training images per second over the time spent
inside batches, leaving out the first 5 (tracing, warm-up). Peak RSS is each process's own
(from wait4). Prints one line per run, then the median per configuration and its ratio to the
reference's median. Configurations override `train.*` params: the default `ours` is params.yaml
as it is (the original's hyperparameters).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def worker(prepared: str, train_images: int, overrides: dict) -> None:
    """One measured training run of ours (in a child process); prints a JSON line."""
    import math

    import keras

    from alexnet8.dataset import load_split
    from alexnet8.input_pipeline import training_dataset
    from alexnet8.optimization import build_compiled_model
    from alexnet8.params import load_params
    from alexnet8.runtime import configure_runtime

    params = load_params(PROJECT_ROOT / "params.yaml")
    train_params = params.train.model_copy(update=overrides)
    configure_runtime(train_params)
    keras.utils.set_random_seed(params.seed)
    split = load_split(prepared, "train")
    model = build_compiled_model(
        train_params, num_classes=10, steps_per_epoch=math.ceil(len(split.labels) / train_params.batch_size)
    )

    class Throughput(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.images, self.seconds, self.start = 0, 0.0, 0.0

        def on_train_batch_begin(self, batch, logs=None):
            self.start = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            if batch >= 5:
                self.seconds += time.perf_counter() - self.start
                self.images += train_params.batch_size

    meter = Throughput()
    started = time.perf_counter()
    model.fit(
        training_dataset(train_params, split, params.seed, num_classes=10),
        epochs=1,
        steps_per_epoch=math.ceil(train_images / train_params.batch_size),
        callbacks=[meter],
        verbose=0,
    )
    print(json.dumps({"images_per_second": meter.images / meter.seconds, "fit_seconds": time.perf_counter() - started}))


def measure(command: list[str]) -> tuple[float, float, str]:
    """Run `command`; return (images/s it printed, its peak RSS in MB, its output)."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=PROJECT_ROOT)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{output}")
    match = re.search(r'train_images_per_second (\S+)|"images_per_second": ([0-9.e+-]+)', output)
    if not match:
        raise SystemExit(f"no throughput in the output of {' '.join(command)}:\n{output}")
    return float(match.group(1) or match.group(2)), usage.ru_maxrss / 1024, output


def with_training_argument(script: str) -> str:
    """The reference script with its model's `call(self, x)` taking `training`, so that Keras 3
    runs its batch norm and dropout in training mode during `fit`, as Keras 2 did."""
    patched, count = re.subn(r"def call\(self, x\):", "def call(self, x, training=None):", script)
    if count != 1:
        raise SystemExit(f"--intended-reference: expected one `def call(self, x):` in the reference, found {count}")
    return patched


def parse_config(text: str) -> tuple[str, dict]:
    import yaml

    name, _, assignments = text.partition("=")
    overrides = {}
    for assignment in filter(None, assignments.split(",")):
        key, _, value = assignment.partition("=")
        overrides[key.removeprefix("train.")] = yaml.safe_load(value)
    return name, overrides


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("archive", nargs="?")
    parser.add_argument(
        "--reference", help="the original script, run as written (it takes ARCHIVE, --train-images, --epochs); required"
    )
    parser.add_argument("--train-images", type=int, default=3200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--config", action="append", default=[], help="NAME=key=value,... (train.* overrides); repeatable"
    )
    parser.add_argument(
        "--intended-reference",
        action="store_true",
        help="also run the reference with batch norm and dropout in training mode (see above)",
    )
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if not arguments.worker and not (arguments.archive and arguments.reference):
        parser.error("ARCHIVE and --reference are required")
    return arguments


def round_commands(
    arguments: argparse.Namespace, references: dict[str, str], configs: dict[str, dict], prepared: Path
) -> list[tuple[str, list[str]]]:
    """One round's runs, (name, command): each reference script as written, then each of our configurations."""
    images = str(arguments.train_images)
    runs = [
        (name, [sys.executable, script, arguments.archive, "--train-images", images, "--epochs", "1"])
        for name, script in references.items()
    ]
    runs += [
        (name, [sys.executable, __file__, "--worker", str(prepared), images, json.dumps(overrides)])
        for name, overrides in configs.items()
    ]
    return runs


def print_medians(results: dict[str, list[tuple[float, float]]], configs: dict[str, dict]) -> None:
    """Each run's median speed and peak memory, and their ratios to the reference's (and to ref-intended's)."""
    reference_speed = statistics.median(speed for speed, _ in results["reference"])
    reference_memory = statistics.median(memory for _, memory in results["reference"])
    intended_speed = statistics.median(speed for speed, _ in results.get("ref-intended", [(0.0, 0.0)]))
    for name, values in results.items():
        speed = statistics.median(value for value, _ in values)
        memory = statistics.median(value for _, value in values)
        against_intended = f", {speed / intended_speed:.2f}x ref-intended" if intended_speed else ""
        print(
            f"{name:>12}: {speed:7.2f} images/s ({speed / reference_speed:.2f}x reference{against_intended}), "
            f"peak RSS {memory:6.0f} MB ({memory / reference_memory:.2f}x reference)  {configs.get(name, '')}"
        )


def main() -> None:
    arguments = parse_arguments()
    if arguments.worker:
        worker(arguments.worker[0], int(arguments.worker[1]), json.loads(arguments.worker[2]))
        return

    from alexnet8.params import load_params
    from alexnet8.preprocess import preprocess

    configs = dict(parse_config(text) for text in arguments.config) or {"ours": {}}
    params = load_params(PROJECT_ROOT / "params.yaml")
    with tempfile.TemporaryDirectory() as folder:
        references = {"reference": arguments.reference}
        if arguments.intended_reference:
            references["ref-intended"] = str(Path(folder) / Path(arguments.reference).name)
            Path(references["ref-intended"]).write_text(with_training_argument(Path(arguments.reference).read_text()))
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in [*references, *configs]}
        prepared = Path(folder) / "prepared"
        preprocess(arguments.archive, prepared, params.preprocess, params.seed)
        for round_number in range(1, arguments.rounds + 1):
            for name, command in round_commands(arguments, references, configs, prepared):
                images_per_second, peak_mb, _ = measure(command)
                results[name].append((images_per_second, peak_mb))
                print(
                    f"round {round_number} {name:>12}: {images_per_second:7.2f} images/s, peak RSS {peak_mb:7.0f} MB",
                    flush=True,
                )
    print(
        f"\nmedian of {arguments.rounds} rounds, {arguments.train_images} training images, "
        f"batch {params.train.batch_size}:"
    )
    print_medians(results, configs)


if __name__ == "__main__":
    main()
