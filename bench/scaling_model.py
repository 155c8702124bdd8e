"""When do N workers pay off? The data-parallel step-time model of docs/performance.md.

Reads and writes nothing; prints Markdown tables.

Each step, every worker computes the gradients of its batch_size / N images, then the workers
sum the gradients with a ring all-reduce: each sends and receives 2 (N - 1) / N times the
gradients' size over its link. With no overlap of the two (Keras' step all-reduces once all
gradients exist):

    step time(N) = (G / N) / r + 2 (N - 1) / N * P / B + 2 (N - 1) * latency

G global batch, r one worker's throughput (images/s), P the bytes of the gradients, B the link's
bandwidth (bytes/s). N workers beat one when G / r * (N - 1) / N exceeds the all-reduce time,
that is (latency aside) when G > 2 P r / B, whatever N.

    python bench/scaling_model.py --rate 215 --rate 5000
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

PARAMETERS = 9_639_178  # AlexNet8 at the defaults (docs/model.md)
GRADIENT_BYTES = PARAMETERS * 4  # float32: 38.6 MB
LINKS_GBIT = (1, 10, 25, 100)
WORKERS = (2, 4, 8)
BATCHES = (32, 128, 512, 2048)
LATENCY_SECONDS = 50e-6  # one message's latency on a data-centre network


def step_seconds(workers: int, global_batch: int, rate: float, bandwidth: float, latency: float = LATENCY_SECONDS):
    """Seconds per training step of `workers` workers (see the module doc); 1 worker has no all-reduce."""
    compute = global_batch / workers / rate
    if workers == 1:
        return compute
    return compute + 2 * (workers - 1) / workers * GRADIENT_BYTES / bandwidth + 2 * (workers - 1) * latency


def speedup(workers: int, global_batch: int, rate: float, bandwidth: float) -> float:
    return step_seconds(1, global_batch, rate, bandwidth) / step_seconds(workers, global_batch, rate, bandwidth)


def break_even_batch(rate: float, bandwidth: float) -> float:
    """The global batch above which any number of workers beats one (latency aside)."""
    return 2 * GRADIENT_BYTES * rate / bandwidth


def table(rate: float) -> str:
    lines = [
        f"One worker at {rate:g} images/s; gradients {GRADIENT_BYTES / 1e6:.1f} MB per step.",
        "",
        "| link | break-even global batch | "
        + " | ".join(f"batch {batch}: 2 / 4 / 8 workers" for batch in BATCHES)
        + " |",
        "| --- | --- | " + " | ".join("---" for _ in BATCHES) + " |",
    ]
    for gbit in LINKS_GBIT:
        bandwidth = gbit * 1e9 / 8
        cells = [
            " / ".join(f"{speedup(workers, batch, rate, bandwidth):.2f}x" for workers in WORKERS) for batch in BATCHES
        ]
        lines.append(f"| {gbit} Gbit/s | {break_even_batch(rate, bandwidth):.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rate", type=float, action="append", help="one worker's training images/s (repeatable; default 215)"
    )
    arguments = parser.parse_args(argv)
    print("\n\n".join(table(rate) for rate in arguments.rate or [215.0]))  # noqa: T201 (the script's output)


if __name__ == "__main__":
    main()
