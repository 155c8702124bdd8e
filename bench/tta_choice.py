#!/usr/bin/env python3
"""Which test-time augmentation to choose for a trained model: its validation accuracy under each.

Usage (from the project's root, in the activated environment):
  python bench/tta_choice.py [--model models/model.keras] [--data data/prepared] [--translate 1 --translate 2]

Reads the model and the prepared folder's validation split (never the test split: a recipe's
test-time augmentation is chosen on validation, as its training params are). Prints a markdown
table: for no augmentation, the mirror (`evaluate.flip_tta`), and the mirror with each
`--translate` (`evaluate.tta_translate`), the validation accuracy and loss, and the seconds the
5,000 images took (each view is one more pass of the model).
"""

from __future__ import annotations

import argparse
import logging
import time

from alexnet8.dataset import load_description, load_split
from alexnet8.evaluate import evaluate_model, load_trained_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/model.keras")
    parser.add_argument("--data", default="data/prepared")
    parser.add_argument("--translate", type=int, action="append", help="pixels (repeatable; default 1 and 2)")
    parser.add_argument("--batch-size", type=int, default=500)
    arguments = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    model = load_trained_model(arguments.model)
    split = load_split(arguments.data, "validation")
    classes = load_description(arguments.data).class_names
    choices = [(False, 0), (True, 0)] + [(True, pixels) for pixels in arguments.translate or (1, 2)]
    print("| flip_tta | tta_translate | validation accuracy | validation loss | seconds |")
    print("| --- | --- | --- | --- | --- |")
    for flip, translate in choices:
        start = time.perf_counter()
        metrics, _ = evaluate_model(model, split, classes, arguments.batch_size, flip, translate, "validation")
        seconds = time.perf_counter() - start
        print(
            f"| {str(flip).lower()} | {translate} | {metrics['accuracy']:.4f} | {metrics['loss']:.4f} | {seconds:.0f} |"
        )


if __name__ == "__main__":
    main()
