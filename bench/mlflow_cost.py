#!/usr/bin/env python3
"""What MLflow tracking adds to a train stage, in seconds: every tracking call train.main makes.

Usage:
  python bench/mlflow_cost.py [--epochs 5]

In a temporary folder (its own local store, nothing else touched), with the project's params.yaml
and the full-size AlexNet8 (untrained: logging does not depend on the weights' values), times:
starting the pipeline's run, its params, provenance tags and artifacts, the network's summary and
the metrics of each epoch (sent in the background), and logging the model (signature, input
example). Prints each, and the total; divide by the training time of an epoch times the epochs
for the share of the train stage.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=5)
    arguments = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.pop("MLFLOW_TRACKING_URI", None)

    import numpy as np

    from alexnet8.dataset import DatasetDescription
    from alexnet8.epoch_logging import EpochMetricsAndSummaryToMlflow
    from alexnet8.image_classifier import view_config
    from alexnet8.network import build_alexnet8
    from alexnet8.params import load_params
    from alexnet8.served_model import log_classifier
    from alexnet8.tracking import log_run_inputs, start_pipeline_run

    params = load_params(PROJECT_ROOT / "params.yaml")
    model = build_alexnet8(dense_units=params.train.dense_units, dropout=params.train.dropout)
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    class_names = [f"class{index}" for index in range(10)]
    description = DatasetDescription(
        class_names=class_names, sizes={"train": 2}, normalization={"name": "unit"}, archive_md5="0" * 32, seed=0
    )
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as folder:
        os.chdir(folder)
        model.save(Path(folder) / "model.keras")
        Path(folder, "dataset.json").write_text(json.dumps(description.as_written()))
        started = time.perf_counter()
        with start_pipeline_run(params.mlflow.experiment_name, "mlflow-cost", Path(folder) / "run.json"):
            seconds["start the run"] = time.perf_counter() - started
            started = time.perf_counter()
            log_run_inputs(params, PROJECT_ROOT / "params.yaml", description, prepared_md5="0" * 32)
            seconds["params, tags, provenance"] = time.perf_counter() - started
            started = time.perf_counter()
            # As fit drives it: the summary and each epoch's metrics go in a background thread,
            # which on_train_end waits for; the time is what training would wait, at most.
            epoch_metrics = EpochMetricsAndSummaryToMlflow(Path(folder) / "history.csv")
            epoch_metrics.set_model(model)
            epoch_metrics.on_train_begin()
            for epoch in range(arguments.epochs):
                epoch_metrics.on_epoch_end(epoch, {"accuracy": 0.5, "loss": 1.5, "val_accuracy": 0.5, "val_loss": 1.5})
            epoch_metrics.on_train_end()
            seconds[f"summary, metrics of {arguments.epochs} epochs"] = time.perf_counter() - started
            started = time.perf_counter()
            model_file, dataset_file = Path(folder) / "model.keras", Path(folder) / "dataset.json"
            log_classifier(model_file, dataset_file, class_names, view_config(), images, "cost", params={})
            seconds["the model"] = time.perf_counter() - started
        os.chdir(PROJECT_ROOT)
    for name, value in seconds.items():
        logging.info("%-28s %6.2f s", name, value)
    logging.info("%-28s %6.2f s", "total", sum(seconds.values()))


if __name__ == "__main__":
    main()
