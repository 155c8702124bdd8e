#!/usr/bin/env python3
"""Accuracy and loss per epoch of one or more training runs: the figures of the docs.

Usage:
    python docs/figures/recipes_figure.py [--source TEXT] OUT.png NAME=HISTORY.csv [NAME=HISTORY.csv ...]
    python docs/figures/recipes_figure.py --stage [--source TEXT] OUT.png NAME=HISTORY.csv

The first draws each run's validation (solid) and training (dashed) curves on one figure; with
--stage, one run is drawn as the pipeline's plot stage draws reports/figures/training_curves.png.
Each HISTORY.csv is a train stage's `reports/train_history.csv` (a row per epoch: `epoch` from 1,
then train/ and val/ accuracy and loss), such as docs/results/<run>_history.csv. --source writes
where the runs came from (data, machine, date) under the plots. Reads only those files; writes
OUT.png.
"""

from __future__ import annotations

import argparse
import textwrap
from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure

from alexnet8.errors import DataError
from alexnet8.plot import curves_figure, read_history, save_figure


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", action="store_true", help="draw one run as the plot stage does")
    parser.add_argument("--source", help="a line under the plots: the data, machine and date the runs came from")
    parser.add_argument("out")
    parser.add_argument("histories", nargs="+", metavar="NAME=HISTORY.csv")
    arguments = parser.parse_args(argv)
    recipes = []
    for pair in arguments.histories:
        name, separator, path = pair.partition("=")
        if not (separator and name and path):
            parser.error(f"expected NAME=HISTORY.csv, got {pair!r}")
        # Read every history before drawing, so a bad file stops the script before OUT.png is touched.
        try:
            recipes.append((name, read_history(path)))
        except DataError as error:
            parser.error(str(error))
    if arguments.stage:
        if len(recipes) != 1:
            parser.error(f"--stage draws one run, got {len(recipes)}")
        save_figure(with_source(curves_figure(recipes[0][1]), arguments.source), arguments.out)
        return
    figure = Figure(figsize=(11, 4.2))
    accuracy_axes, loss_axes = figure.subplots(1, 2)
    for name, history in recipes:
        epochs = np.arange(1, len(history["train/loss"]) + 1)
        for axes, metric in ((accuracy_axes, "accuracy"), (loss_axes, "loss")):
            (line,) = axes.plot(epochs, history[f"val/{metric}"], marker="o", label=f"{name} (validation)")
            axes.plot(epochs, history[f"train/{metric}"], linestyle="--", color=line.get_color(), alpha=0.6)
    for axes, title in ((accuracy_axes, "Accuracy"), (loss_axes, "Loss")):
        axes.set_title(f"{title} per epoch (solid: validation, dashed: training)")
        axes.set_xlabel("epoch")
        axes.xaxis.get_major_locator().set_params(integer=True)
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
    figure.tight_layout()
    save_figure(with_source(figure, arguments.source), arguments.out)


def with_source(figure: Figure, source: str | None) -> Figure:
    """`figure` with `source` written small under its plots (which move up to make room)."""
    if source:
        # Wrapped to the figure's width (about 14 characters an inch at this size).
        lines = textwrap.wrap(source, width=int(figure.get_figwidth() * 14))
        figure.text(0.5, 0.01, "\n".join(lines), ha="center", va="bottom", fontsize="small", color="0.3")
        figure.tight_layout(rect=(0, 0.03 + 0.035 * len(lines), 1, 1))
    return figure


if __name__ == "__main__":
    main()
