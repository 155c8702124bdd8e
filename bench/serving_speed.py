#!/usr/bin/env python3
"""How fast the logged model answers: pyfunc `predict` in-process, and `mlflow models serve` over HTTP.

Usage (from the project's root, in the activated environment):
  python bench/serving_speed.py [--requests-1 200] [--requests-256 20]

In a temporary folder with its own SQLite store (nothing else touched), logs the full-size
AlexNet8 (dense_units=2048; untrained: speed does not depend on the weights' values) with
`log_classifier`, then measures, at batch 1 and 256, the images per second and the latency of
each call (p50, p99):

- in-process: `mlflow.pyfunc.load_model(...).predict(uint8 array)`, schema check included;
- HTTP: `POST /invocations` with `{"inputs": [...]}` (0-255 ints) to `mlflow models serve
  --env-manager local` on 127.0.0.1, one request at a time over a kept-alive connection. The
  request bodies are encoded once beforehand: client-side JSON encoding is not counted.

In-process at batch 256 it also times the same network with test-time views (`flip_tta`, and
`flip_tta` with `tta_translate: 1`): what a served model with those `evaluate.*` params costs.

A few calls of each kind warm up first (tf.function tracing) and are not counted. Prints a
markdown table, and the load average before and after: other work on the machine slows both paths.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BATCH_SIZES = (1, 256)
WARM_UP_CALLS = 3
STARTUP_SECONDS = 300
REQUEST_SECONDS = 300


@dataclass(frozen=True)
class Timing:
    path: str
    batch_size: int
    seconds: list[float]  # one per call

    @property
    def images_per_second(self) -> float:
        return self.batch_size * len(self.seconds) / sum(self.seconds)

    def percentile_ms(self, percent: float) -> float:
        return float(np.percentile(self.seconds, percent)) * 1000


def time_calls(path: str, batch_size: int, calls: int, call: Callable[[], object]) -> Timing:
    for _ in range(WARM_UP_CALLS):
        call()
    seconds = []
    for _ in range(calls):
        started = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - started)
    return Timing(path, batch_size, seconds)


def table(timings: list[Timing]) -> str:
    lines = [
        "| path | batch | calls | images/s | p50 ms | p99 ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for timing in timings:
        lines.append(
            f"| {timing.path} | {timing.batch_size} | {len(timing.seconds)} | {timing.images_per_second:,.1f} "
            f"| {timing.percentile_ms(50):,.1f} | {timing.percentile_ms(99):,.1f} |"
        )
    return "\n".join(lines)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def served(model_uri: str, tracking_uri: str, folder: Path) -> Iterator[str]:
    """`mlflow models serve` of `model_uri` on a free 127.0.0.1 port; its URL. Ends its process
    group (mlflow and the uvicorn it starts) on exit."""
    import requests

    port = free_port()
    log = folder / "server.log"
    command = [
        "mlflow",
        "models",
        "serve",
        "-m",
        model_uri,
        "--env-manager",
        "local",
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
    ]
    # As after `source .venv/bin/activate`: mlflow runs `bash -c "exec uvicorn ..."`, found on PATH.
    scripts = str(Path(sys.executable).parent)
    environment = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "VIRTUAL_ENV": sys.prefix}
    environment["PATH"] = os.pathsep.join([scripts, environment.get("PATH", "")])
    with open(log, "wb") as output:
        process = subprocess.Popen(
            command, cwd=folder, env=environment, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"mlflow models serve exited ({process.returncode}):\n{log.read_text()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"mlflow models serve did not answer in {STARTUP_SECONDS} s:\n{log.read_text()}")
            with contextlib.suppress(requests.ConnectionError):
                if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                    break
            time.sleep(0.5)
        yield url
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)


def machine_load() -> str:
    return "load average " + " ".join(Path("/proc/loadavg").read_text().split()[:3])


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests-1", type=int, default=200, help="timed calls at batch 1")
    parser.add_argument("--requests-256", type=int, default=20, help="timed calls at batch 256")
    arguments = parser.parse_args()
    calls = {1: arguments.requests_1, 256: arguments.requests_256}
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    os.environ.pop("MLFLOW_TRACKING_URI", None)

    import mlflow
    import requests

    from alexnet8.classifier_model import ImageClassifier, view_config
    from alexnet8.model import build_alexnet8
    from alexnet8.preprocess import CLASS_NAMES
    from alexnet8.served_model import log_classifier

    logging.info("%s, %d CPUs; %s at the start", cpu_name(), os.cpu_count(), machine_load())
    images = np.random.default_rng(0).integers(0, 256, (max(BATCH_SIZES), 32, 32, 3), dtype=np.uint8)
    timings: list[Timing] = []
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        tracking_uri = f"sqlite:///{folder / 'mlflow.db'}"
        os.chdir(folder)  # a new store puts its artifacts in ./mlruns
        mlflow.set_tracking_uri(tracking_uri)
        build_alexnet8(dense_units=2048).save(folder / "model.keras")
        (folder / "dataset.json").write_text(json.dumps({"class_names": list(CLASS_NAMES)}))
        with mlflow.start_run():
            logged = log_classifier(
                folder / "model.keras",
                folder / "dataset.json",
                list(CLASS_NAMES),
                view_config(),
                images[:2],
                "serving-speed",
                params={},
            )

        model = mlflow.pyfunc.load_model(logged.model_uri)
        # What test-time views cost a served image: the same network with each view setting.
        network = model.unwrap_python_model().network
        batch = images[: max(BATCH_SIZES)]
        for flip, translate in ((True, 0), (True, 1)):
            with_views = ImageClassifier.assembled(network, list(CLASS_NAMES), view_config(flip, translate))
            label = f"pyfunc predict, flip_tta={flip}, tta_translate={translate}"
            timings.append(
                time_calls(label, len(batch), calls[len(batch)], lambda c=with_views: c.predict(None, batch))
            )
        for batch_size in BATCH_SIZES:
            batch = images[:batch_size]
            timings.append(
                time_calls("pyfunc predict", batch_size, calls[batch_size], lambda b=batch: model.predict(b))
            )

        with served(logged.model_uri, tracking_uri, folder) as url, requests.Session() as session:
            for batch_size in BATCH_SIZES:
                body = json.dumps({"inputs": images[:batch_size].tolist()}).encode()

                def post(body: bytes = body, batch_size: int = batch_size) -> None:
                    response = session.post(
                        f"{url}/invocations",
                        data=body,
                        headers={"Content-Type": "application/json"},
                        timeout=REQUEST_SECONDS,
                    )
                    if response.status_code != 200 or len(response.json()["predictions"]) != batch_size:
                        raise RuntimeError(f"/invocations answered {response.status_code}: {response.text[:500]}")

                timings.append(time_calls("HTTP /invocations", batch_size, calls[batch_size], post))
                logging.info("batch %d: %.0f kB per request", batch_size, len(body) / 1000)
        os.chdir(Path(__file__).resolve().parents[1])
    logging.info("%s at the end", machine_load())
    print(table(timings))


if __name__ == "__main__":
    main()
