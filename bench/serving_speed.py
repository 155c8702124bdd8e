#!/usr/bin/env python3
"""How fast the logged model answers: pyfunc `predict` in-process, and `mlflow models serve` over HTTP,
for each input form, measured side by side.

Usage (from the project's root, in the activated environment):
  python bench/serving_speed.py [--rounds 5] [--overload]

In a temporary folder with its own SQLite store (nothing else touched), logs the full-size
AlexNet8 (dense_units=2048; untrained: speed does not depend on the weights' values) with
`log_classifier`, serves it with `mlflow models serve --env-manager local` on 127.0.0.1, and
measures each case (path, input form, batch size) in `--rounds` rounds, the cases taking turns
call by call, so that other work on the machine slows them alike:

- in-process: `mlflow.pyfunc.load_model(...).predict(...)` on a uint8 array (the baseline) or on
  the image files' bytes;
- HTTP: `POST /invocations`, one request at a time over a kept-alive connection, the answer's
  JSON decoded: JSON integers (`{"inputs": [image, ...]}`), raw pixels in base64
  (`{"inputs": {"pixels": [...]}}`), 32 x 32 PNG files in base64 (`{"inputs": [...]}`), and
  12-megapixel JPEG photos. Request bodies are encoded once beforehand: client-side encoding is
  not counted.

The images are random noise (the worst case for PNG size and decoding); the photos are a smooth
gradient with noise, 4032 x 3024, JPEG quality 90. Peak memory is the peak resident set of the
process doing the work (this one in-process, the server's over HTTP), reset before each call.
A few calls of each kind warm up first (tf.function tracing) and are not counted.

Also prints where a 256-image request's time goes in the server (MLflow's JSON parsing, the
model, writing the answer: the same functions the server calls, timed in this process), and
in-process rows with test-time views (`flip_tta`, `tta_translate`). With `--overload`, for each
of OVERLOADS, 100 clients at once each send 128 images to a new server with a 10 s request
timeout and give up after 10 s; then one image is sent; the answers, that image's latency and the
server's peak memory are printed.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

WARM_UP_CALLS = 3
STARTUP_SECONDS = 300
REQUEST_SECONDS = 300
PHOTO_SIZE = (4032, 3024)
BASELINE = ("in-process pyfunc", "uint8 array", 256)


@dataclass
class Timing:
    path: str
    form: str
    batch_size: int
    seconds: list[float] = field(default_factory=list)  # one per call
    peak_bytes: int = 0

    @property
    def images_per_second(self) -> float:
        return self.batch_size * len(self.seconds) / sum(self.seconds)

    def percentile_ms(self, percent: float) -> float:
        return float(np.percentile(self.seconds, percent)) * 1000


def time_calls(timing: Timing, calls: int, call: Callable[[], object], warm_up: int = 0) -> Timing:
    """`call` `warm_up` times, then `calls` times timed into `timing`."""
    for _ in range(warm_up):
        call()
    for _ in range(calls):
        started = time.perf_counter()
        call()
        timing.seconds.append(time.perf_counter() - started)
    return timing


def table(timings: list[Timing], baseline: Timing | None = None) -> str:
    lines = [
        "| path | input form | batch | calls | images/s | vs baseline | p50 ms | p99 ms | peak memory |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for timing in timings:
        ratio = f"{timing.images_per_second / baseline.images_per_second:.2f}x" if baseline else ""
        memory = f"{timing.peak_bytes / 2**30:.2f} GB" if timing.peak_bytes else ""
        lines.append(
            f"| {timing.path} | {timing.form} | {timing.batch_size} | {len(timing.seconds)} "
            f"| {timing.images_per_second:,.1f} | {ratio} | {timing.percentile_ms(50):,.1f} "
            f"| {timing.percentile_ms(99):,.1f} | {memory} |"
        )
    return "\n".join(lines)


# --- processes and their memory -------------------------------------------------------------


def peak_memory(pid: int) -> int:
    """The process's peak resident set since it started or was last reset (bytes)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def reset_peak_memory(pid: int) -> None:
    with contextlib.suppress(OSError):  # Linux >= 4.0; without it the peak is since the start
        Path(f"/proc/{pid}/clear_refs").write_text("5")


def descendants(pid: int) -> list[int]:
    children = []
    for status in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            if int(status.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                children.append(int(status.parent.name))
    return children + [grandchild for child in children for grandchild in descendants(child)]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass(frozen=True)
class Served:
    url: str
    pid: int  # the process that loaded the model (uvicorn), whose memory is the server's


@contextlib.contextmanager
def served(
    model_uri: str,
    tracking_uri: str,
    folder: Path,
    timeout: int = 60,
    environment: dict[str, str] | None = None,
    workers: int = 1,
) -> Iterator[Served]:
    """`mlflow models serve` of `model_uri` on a free 127.0.0.1 port. Ends its process group
    (mlflow and the uvicorn it starts) on exit."""
    import requests

    port = free_port()
    log = folder / f"server-{port}.log"
    command = ["mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local"]
    command += ["-h", "127.0.0.1", "-p", str(port), "-t", str(timeout), "-w", str(workers)]
    # As after `source .venv/bin/activate`: mlflow runs `bash -c "exec uvicorn ..."`, found on PATH.
    scripts = str(Path(sys.executable).parent)
    environment = {**os.environ, **(environment or {}), "MLFLOW_TRACKING_URI": tracking_uri, "VIRTUAL_ENV": sys.prefix}
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
        yield Served(url, max(descendants(process.pid) or [process.pid], key=peak_memory))
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


# --- the input forms ------------------------------------------------------------------------


def encoded(pixels: np.ndarray, file_format: str, **options) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=file_format, **options)
    return buffer.getvalue()


def photo(seed: int) -> bytes:
    """A 12-megapixel JPEG: a smooth gradient with some noise, as a phone photo compresses."""
    width, height = PHOTO_SIZE
    rows, columns = np.mgrid[0:height, 0:width]
    smooth = np.stack([columns * 255 // width, rows * 255 // height, (rows + columns) * 255 // (width + height)], -1)
    noise = np.random.default_rng(seed).integers(-20, 20, (height, width, 3))
    return encoded(np.clip(smooth + noise, 0, 255).astype(np.uint8), "JPEG", quality=90)


def text(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def http_bodies(images: np.ndarray, photos: list[bytes]) -> dict[str, Callable[[int], bytes]]:
    """Each HTTP input form: a function of the batch size giving the request body."""
    pngs = [text(encoded(image, "PNG")) for image in images]
    raw = [text(image.tobytes()) for image in images]
    return {
        "JSON integers": lambda n: json.dumps({"inputs": images[:n].tolist()}).encode(),
        "raw pixels, base64": lambda n: json.dumps({"inputs": {"pixels": raw[:n]}}).encode(),
        "32 x 32 PNG files, base64": lambda n: json.dumps({"inputs": pngs[:n]}).encode(),
        "12 MP JPEG photos, base64": lambda n: json.dumps({"inputs": [text(item) for item in photos[:n]]}).encode(),
    }


# --- the measurements -----------------------------------------------------------------------


def cases(model, images: np.ndarray, photos: list[bytes], session, server: Served) -> list[tuple]:
    """(path, form, batch size, timed calls per round, the call, the pid whose memory it uses)."""
    bodies = http_bodies(images, photos)

    def post(body: bytes, count: int) -> Callable[[], None]:
        def call() -> None:
            response = session.post(
                f"{server.url}/invocations",
                data=body,
                headers={"Content-Type": "application/json"},
                timeout=REQUEST_SECONDS,
            )
            if response.status_code != 200 or len(response.json()["predictions"]) != count:
                raise RuntimeError(f"/invocations answered {response.status_code}: {response.text[:500]}")

        return call

    here = os.getpid()
    rows = []
    for batch_size, calls in ((256, 4), (1, 40)):
        rows.append(
            (
                "in-process pyfunc",
                "uint8 array",
                batch_size,
                calls,
                lambda b=images[:batch_size]: model.predict(b),
                here,
            )
        )
        for form in ("JSON integers", "raw pixels, base64", "32 x 32 PNG files, base64"):
            rows.append(("HTTP", form, batch_size, calls, post(bodies[form](batch_size), batch_size), server.pid))
    for batch_size, calls in ((8, 2), (1, 8)):
        rows.append(
            (
                "in-process pyfunc",
                "12 MP JPEG photos, bytes",
                batch_size,
                calls,
                lambda b=photos[:batch_size]: model.predict(b),
                here,
            )
        )
        body = bodies["12 MP JPEG photos, base64"](batch_size)
        rows.append(("HTTP", "12 MP JPEG photos, base64", batch_size, calls, post(body, batch_size), server.pid))
    return rows


def side_by_side(rows: list[tuple], rounds: int) -> list[Timing]:
    """Every case's calls, taking turns call by call (a case with fewer calls per round drops out
    of the turns early), `rounds` times; each case's peak memory is the highest over its calls."""
    timings = [Timing(path, form, batch_size) for path, form, batch_size, *_ in rows]
    for _, _, _, _, call, _ in rows:
        time_calls(Timing("", "", 1), 0, call, warm_up=WARM_UP_CALLS)
    for round_index in range(rounds):
        for turn in range(max(calls for _, _, _, calls, _, _ in rows)):
            for timing, (_, _, _, calls, call, pid) in zip(timings, rows, strict=True):
                if turn < calls:
                    reset_peak_memory(pid)
                    time_calls(timing, 1, call)
                    timing.peak_bytes = max(timing.peak_bytes, peak_memory(pid))
        logging.info("round %d of %d done; %s", round_index + 1, rounds, machine_load())
    return timings


def server_side(model, images: np.ndarray, photos: list[bytes], repeats: int = 5) -> str:
    """Where a request's time goes in MLflow's scoring server, per form (ms, median of `repeats`):
    parsing the JSON into the model's input, the model's predict, writing the JSON answer."""
    from mlflow.pyfunc import scoring_server

    schema = model.metadata.get_input_schema()
    lines = ["| input form | batch | body MB | parse ms | predict ms | answer ms |", "|---|---:|---:|---:|---:|---:|"]
    bodies = http_bodies(images, photos)
    for form, batch_size in [(form, 256) for form in list(bodies)[:3]] + [("12 MP JPEG photos, base64", 8)]:
        body, stages = bodies[form](batch_size).decode(), {"parse": [], "predict": [], "answer": []}
        for _ in range(repeats):
            started = time.perf_counter()
            data = scoring_server._parse_json_data(body, model.metadata, schema).data
            parsed = time.perf_counter()
            predictions = model.predict(data)
            predicted = time.perf_counter()
            scoring_server.predictions_to_json(predictions, io.StringIO())
            stages["parse"].append(parsed - started)
            stages["predict"].append(predicted - parsed)
            stages["answer"].append(time.perf_counter() - predicted)
        ms = {stage: f"{np.median(seconds) * 1000:,.1f}" for stage, seconds in stages.items()}
        lines.append(
            f"| {form} | {batch_size} | {len(body) / 1e6:.1f} | {ms['parse']} | {ms['predict']} | {ms['answer']} |"
        )
    return "\n".join(lines)


def with_views(model, images: np.ndarray, calls: int) -> list[Timing]:
    """In-process, at batch 256: the same network with each test-time view setting."""
    from alexnet8.image_classifier import ImageClassifier, view_config
    from alexnet8.preprocess import CLASS_NAMES

    network = model.unwrap_python_model().network
    timings = []
    for flip, translate in ((True, 0), (True, 1)):
        classifier = ImageClassifier.assembled(network, list(CLASS_NAMES), view_config(flip, translate))
        timing = Timing("in-process", f"uint8 array, flip_tta={flip}, tta_translate={translate}", len(images))
        timings.append(time_calls(timing, calls, lambda c=classifier: c.predict(None, images), WARM_UP_CALLS))
    return timings


OVERLOADS = {  # label: (input form, extra environment of the server)
    "JSON integers": ("JSON integers", {}),
    "JSON integers, UVICORN_LIMIT_CONCURRENCY=4": ("JSON integers", {"UVICORN_LIMIT_CONCURRENCY": "4"}),
    "raw pixels, base64": ("raw pixels, base64", {}),
}


def oversized(server: Served, images: np.ndarray, form: str) -> str:
    """One request of 5,000 images (over MAX_IMAGES): its answer, how long, the server's peak memory."""
    import requests

    body = http_bodies(images, [])[form](len(images))
    reset_peak_memory(server.pid)
    started = time.perf_counter()
    response = requests.post(
        f"{server.url}/invocations", data=body, headers={"Content-Type": "application/json"}, timeout=REQUEST_SECONDS
    )
    return (
        f"| 1 x 5,000 images as {form} ({len(body) / 1e6:.0f} MB) | 1 x {response.status_code} "
        f"| {time.perf_counter() - started:.1f} s | | {peak_memory(server.pid) / 2**30:.2f} GB |"
    )


def overload(model_uri: str, tracking_uri: str, folder: Path, images: np.ndarray) -> str:
    """100 clients at once, 128 images each, against a server with a 10 s request timeout, each
    client giving up after 10 s; then a single image: what each got, per form and setting."""
    import requests

    lines = ["| 100 x 128 images as | answers | in | then 1 image | server peak memory |", "|---|---|---:|---:|---:|"]
    headers = {"Content-Type": "application/json"}
    for label, (form, environment) in OVERLOADS.items():
        bodies = http_bodies(images, [])
        body, one = bodies[form](128), bodies[form](1)
        with served(model_uri, tracking_uri, folder, timeout=10, environment=environment) as server:
            requests.post(f"{server.url}/invocations", data=one, headers=headers, timeout=REQUEST_SECONDS)  # warm up
            refused = None if environment else oversized(server, np.concatenate([images] * 20)[:5000], form)
            reset_peak_memory(server.pid)

            def client(_: int, server: Served = server, body: bytes = body) -> str:
                try:
                    return str(
                        requests.post(f"{server.url}/invocations", data=body, headers=headers, timeout=10).status_code
                    )
                except requests.RequestException as error:
                    return type(error).__name__

            started = time.perf_counter()
            with ThreadPoolExecutor(100) as pool:
                outcomes = list(pool.map(client, range(100)))
            storm = time.perf_counter() - started
            started = time.perf_counter()
            status = requests.post(f"{server.url}/invocations", data=one, headers=headers, timeout=REQUEST_SECONDS)
            after = time.perf_counter() - started
            answers = ", ".join(f"{outcomes.count(outcome)} x {outcome}" for outcome in sorted(set(outcomes)))
            lines.append(
                f"| {label} | {answers} | {storm:.1f} s | HTTP {status.status_code} in {after:.2f} s "
                f"| {peak_memory(server.pid) / 2**30:.2f} GB |"
            )
            if refused:
                lines.append(refused)
        logging.info("overload, %s: done; %s", label, machine_load())
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="rounds of turns (each: 4 calls at batch 256, 40 at 1)")
    parser.add_argument("--overload", action="store_true", help="also 100 clients at once against a 10 s timeout")
    arguments = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    os.environ.pop("MLFLOW_TRACKING_URI", None)

    import mlflow
    import requests

    from alexnet8.image_classifier import view_config
    from alexnet8.network import build_alexnet8
    from alexnet8.preprocess import CLASS_NAMES
    from alexnet8.served_model import log_classifier

    logging.info("%s, %d CPUs; %s at the start", cpu_name(), os.cpu_count(), machine_load())
    images = np.random.default_rng(0).integers(0, 256, (256, 32, 32, 3), dtype=np.uint8)
    photos = [photo(seed) for seed in range(8)]
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        tracking_uri = f"sqlite:///{folder / 'mlflow.db'}"
        os.chdir(folder)  # a new store puts its artifacts in ./mlruns
        mlflow.set_tracking_uri(tracking_uri)
        build_alexnet8(dense_units=2048).save(folder / "model.keras")
        (folder / "dataset.json").write_text(json.dumps({"class_names": list(CLASS_NAMES)}))
        with mlflow.start_run():
            files = (folder / "model.keras", folder / "dataset.json")
            logged = log_classifier(*files, list(CLASS_NAMES), view_config(), images[:2], "serving-speed", params={})
        model = mlflow.pyfunc.load_model(logged.model_uri)
        with served(logged.model_uri, tracking_uri, folder) as server, requests.Session() as session:
            timings = side_by_side(cases(model, images, photos, session, server), arguments.rounds)
        where = server_side(model, images, photos)
        views = with_views(model, images, calls=10)
        stormed = overload(logged.model_uri, tracking_uri, folder, images) if arguments.overload else None
        os.chdir(Path(__file__).resolve().parents[1])
    logging.info("%s at the end", machine_load())
    baseline = next(timing for timing in timings if (timing.path, timing.form, timing.batch_size) == BASELINE)
    print(table(timings, baseline))
    print("\nIn the server, one request (this process, the same functions):\n")
    print(where)
    print("\nTest-time views, in-process at batch 256:\n")
    print(table(views, baseline))
    if stormed:
        print("\nOverload: 100 clients at once, a 10 s request timeout (`-t 10`), clients giving up after 10 s:\n")
        print(stormed)


if __name__ == "__main__":
    main()
