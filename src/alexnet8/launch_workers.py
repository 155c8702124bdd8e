"""Run a multi-worker training on this machine: N processes of the train stage, one per worker.

`python -m alexnet8.launch_workers --workers 2 [-- command ...]` starts the command (by default the
train stage's command of dvc.yaml) N times, each with a `TF_CONFIG` naming all N workers on
127.0.0.1 (free ports picked here) and its own index, and prefixes each worker's output lines
with `[worker k]`. When a worker fails, the others are given a bounded time to fail on their own
(they notice a dead peer and say so), then stopped. Exits with the chief's (worker 0's) exit code,
or the failed worker's if the chief succeeded.

Reads: dvc.yaml (for the default command). Writes nothing itself; the workers write what the
command writes (the chief alone, for the train stage: see multi_worker.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import yaml

from alexnet8 import cli
from alexnet8.errors import PipelineError
from alexnet8.multi_worker import HEARTBEAT_TIMEOUT_SECONDS, TF_CONFIG

logger = logging.getLogger(__name__)

# After a worker fails, how long the others get to notice and exit by themselves (a dead peer is
# detected within the heartbeat timeout, then the error reaches every worker).
GRACE_SECONDS = 3 * HEARTBEAT_TIMEOUT_SECONDS + 30
# After SIGTERM, how long a worker gets to end its MLflow run and remove temporary files.
STOP_SECONDS = 30


def train_stage_command(dvc_yaml: str | Path = "dvc.yaml") -> list[str]:
    """The train stage's command in dvc.yaml, with its `${paths.*}` variables filled in."""
    try:
        pipeline = yaml.safe_load(Path(dvc_yaml).read_text(encoding="utf-8"))
        command = pipeline["stages"]["train"]["cmd"]
        variables = {key: value for entry in pipeline.get("vars", []) for key, value in entry.items()}
    except (OSError, yaml.YAMLError, KeyError, TypeError) as error:
        raise PipelineError(
            f"cannot read the train stage's command from {dvc_yaml} ({error}): give the command after `--`"
        ) from None

    def value(match: re.Match) -> str:
        group, key = match.group(1).split(".", 1)
        return str(variables[group][key])

    return shlex.split(re.sub(r"\$\{([^}]+)\}", value, command))


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports free on 127.0.0.1 now (the OS picks them)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for each in sockets:
            each.bind(("127.0.0.1", 0))
        return [each.getsockname()[1] for each in sockets]
    finally:
        for each in sockets:
            each.close()


def tf_configs(ports: Sequence[int]) -> list[str]:
    """The TF_CONFIG of each worker of a cluster on 127.0.0.1 at `ports`; worker 0 is the chief."""
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    return [json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}) for index in range(len(ports))]


def _relay(stream, prefix: str) -> None:
    for line in stream:
        sys.stderr.write(f"{prefix}{line}")
        sys.stderr.flush()


def _stop(processes: Sequence[subprocess.Popen]) -> None:
    """SIGTERM to the workers still running (they end their MLflow run as KILLED), SIGKILL after STOP_SECONDS."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_SECONDS
    for process in processes:
        try:
            process.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def run_workers(command: Sequence[str], workers: int, grace_seconds: float = GRACE_SECONDS) -> int:
    """Run `command` as `workers` workers of one training on 127.0.0.1; the exit code (see the module doc)."""
    configs = tf_configs(free_ports(workers))
    logger.info("starting %d workers of: %s", workers, shlex.join(command))
    processes: list[subprocess.Popen] = []
    relays = []
    try:
        for index, config in enumerate(configs):
            environment = os.environ | {TF_CONFIG: config}
            process = subprocess.Popen(
                command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
            )
            processes.append(process)
            relay = threading.Thread(target=_relay, args=(process.stdout, f"[worker {index}] "), daemon=True)
            relay.start()
            relays.append(relay)
        failed_at = None
        while any(process.poll() is None for process in processes):
            failures = [index for index, process in enumerate(processes) if process.returncode not in (None, 0)]
            if failures and failed_at is None:
                failed_at = time.monotonic()
                logger.error(
                    "worker %d exited with code %d; waiting up to %.0f s for the others to stop",
                    failures[0],
                    processes[failures[0]].returncode,
                    grace_seconds,
                )
            if failed_at is not None and time.monotonic() - failed_at > grace_seconds:
                logger.error("stopping the workers still running after %.0f s", grace_seconds)
                _stop(processes)
                break
            time.sleep(0.2)
    except KeyboardInterrupt:
        logger.error("interrupted: stopping the workers")
        _stop(processes)
        raise
    finally:
        for relay in relays:
            relay.join(timeout=5)
    codes = [process.returncode for process in processes]
    if codes[0] == 0 and any(codes):
        failed = next(index for index, code in enumerate(codes) if code)
        logger.error("worker %d failed with exit code %d", failed, codes[failed])
        return codes[failed]
    return codes[0]


def main(argv: Sequence[str] | None = None) -> None:
    argument_parser = cli.parser(__doc__.splitlines()[0], reads_params=False)
    argument_parser.add_argument("--workers", type=int, default=2, help="number of worker processes (default: 2)")
    argument_parser.add_argument(
        "--grace", type=float, default=GRACE_SECONDS, help="seconds the others get to stop after a worker fails"
    )
    argument_parser.add_argument(
        "command", nargs=argparse.REMAINDER, help="after --: the command (default: dvc.yaml's train stage)"
    )
    arguments = argument_parser.parse_args(argv)
    command = arguments.command[1:] if arguments.command[:1] == ["--"] else arguments.command
    if arguments.workers < 1:
        raise PipelineError(f"--workers must be at least 1, got {arguments.workers}")
    code = run_workers(command or train_stage_command(), arguments.workers, arguments.grace)
    if code:
        logging.shutdown()
        sys.exit(code)


if __name__ == "__main__":
    cli.run(main)
