#!/usr/bin/env python3
"""Render the results tables of the docs from the committed result files.

Usage:
    python docs/tables.py           # rewrite the tables in the pages
    python docs/tables.py --check   # change nothing; exit 1 if a page's tables are out of date

Reads:
    docs/results/<run>.json          one file per full-data run (fields below)
    docs/results/<run>_history.csv   the run's per-epoch history, when the JSON names one
                                     (the train stage's reports/train_history.csv)
    recipes/<recipe>.yaml            the recipe the JSON names: its params that differ from params.yaml
    params.yaml                      the defaults: the seed a command need not set, the full length in epochs
Writes:
    README.md and docs/*.md, only between the marker comments of a table:

        <!-- table:NAME -->
        ...generated, do not edit...
        <!-- /table -->

    NAME is one of the keys of TABLES at the end of this file.

A run's JSON holds:
    run               its name, the same as the file's stem
    date, machine     when and on what it ran
    archive_md5       md5 of the CIFAR-10 archive it was trained on
    seed              the `seed` param
    based_on          the run a `knob` run is compared with (same seed), or null
    recipe            the recipe it ran: recipes/<recipe>.yaml ("original": params.yaml as it is)
    set               optional: params set on top of the recipe, {"section.key": value}
                      (not `seed` or `fetch.*`); the run's params are params.yaml + recipe + set + seed
    epochs            `train.epochs`
    history           the history CSV's file name in docs/results/, or null if it was not kept
    val/accuracy      only without a history: per-epoch validation accuracy, null where unknown
    epoch_seconds     train-stage wall time of each epoch run (the first includes building the model),
                      or null
    timing            what else ran on the machine meanwhile, or null
    pipeline_seconds  wall time of the whole `dvc repro` / `dvc exp run`, or null
    test/accuracy, test/loss
                      from the evaluate stage, or null (not evaluated, or not recorded)
    commit            optional: the project's commit the run ran (7 to 40 hex digits); without it the
                      tables say "earlier code" and the run's date
    note              optional
    peak_rss_mb       optional: peak resident memory of the whole run, in MB
    original_script   optional: the original script, timed on the same machine just before this run
                      (the one source of its time in the docs): command, seconds (5 epochs with
                      validation, all of it), training_seconds, images_per_second, validation_seconds,
                      other_seconds, peak_rss_mb, validation_accuracy (its last), note
    knob              optional: what the run tried against the run it is based_on (same seed), for the
                      search table
    beside            optional: the run whose 'original_script' measurement this run's time is compared
                      with (timed on the same machine, one after the other), for the time-to-accuracy table
    superseded_by     optional: the run of a recipe that replaced this run's (the recipes table leaves the
                      run out; its file and the pages' mentions of it stay)
    proxy_of          optional: the full-length run whose params this shorter run repeats (other than
                      `train.epochs` and `train.precision`), for the proxy table
    val_served/accuracy
                      optional: validation accuracy of the served model as the evaluate stage measured
                      it, with the run's test-time augmentation (reports/test_metrics.json's
                      val_served.accuracy)

Exit status: 0 done (or up to date), 1 out of date (with --check), 2 a missing or malformed file.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

from alexnet8.errors import ParamsError
from alexnet8.params import load_params
from alexnet8.recipe import load_recipe

logger = logging.getLogger("tables")

ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"^(<!-- table:(?P<name>[\w-]+) -->\n)(?P<body>.*?)^(<!-- /table -->)", re.DOTALL | re.MULTILINE)
CODE = re.compile(r"^(```.*?^```)", re.DOTALL | re.MULTILINE)  # fenced code: markers there are examples
NULL = type(None)
REQUIRED = {
    **dict.fromkeys(["run", "date", "machine", "archive_md5", "recipe"], str),
    **dict.fromkeys(["based_on", "history", "timing"], (str, NULL)),
    **dict.fromkeys(["seed", "epochs"], int),
    **dict.fromkeys(["test/accuracy", "test/loss"], (float, NULL)),
    "epoch_seconds": (list, NULL),
    "pipeline_seconds": (int, float, NULL),
}
HISTORY_COLUMNS = ("epoch", "train/accuracy", "train/loss", "val/accuracy", "val/loss")  # as the train stage writes it
ORIGINAL_SCRIPT = {
    "command": str,
    **dict.fromkeys(["seconds", "training_seconds", "validation_seconds", "other_seconds", "peak_rss_mb"], int),
    "images_per_second": float,
    "val/accuracy": float,
    "note": str,
}
# The archives the runs used, by md5: what the tables call them.
ARCHIVES = {
    "c32a1d4ab5d03f1284b67883e8d87530": "official archive",
    "0f86bb969cf3561244b4124d383e2324": "JPEG copy",
}
# The run the README and the comparisons with the original script show for each recipe.
CURRENT_ORIGINAL = "original-defaults-2026-11-30"
RECOMMENDED = "recipe-sgd-plus"


class ResultsError(Exception):
    """A result file is missing or malformed; the message names the file and the problem."""


@dataclass
class Run:
    record: dict
    recipe: dict[str, object]  # the params of recipes/<recipe>.yaml, as `section.key` -> value
    history: list[dict[str, float]] | None  # one row per epoch, or None if the history was not kept

    @property
    def name(self) -> str:
        return self.record["run"]

    @property
    def validation_accuracy(self) -> list[float | None]:
        if self.history is not None:
            return [row["val/accuracy"] for row in self.history]
        return self.record["val/accuracy"]

    def sort_key(self) -> tuple:
        """Runs of one recipe together, by seed."""
        return (self.record["recipe"], sorted(self.record.get("set", {}).items()), self.record["seed"], self.name)

    @property
    def epochs_run(self) -> int:
        return len(self.validation_accuracy)


# Reading ------------------------------------------------------------------------------------------


def read_history(path: Path) -> list[dict[str, float]]:
    try:
        with open(path, newline="", encoding="utf-8") as stream:
            rows = list(csv.DictReader(stream))
    except FileNotFoundError:
        raise ResultsError(f"{path}: not found") from None
    if not rows:
        raise ResultsError(f"{path}: no epochs in it")
    missing = [column for column in HISTORY_COLUMNS if column not in rows[0]]
    if missing:
        raise ResultsError(f"{path}: missing column(s) {', '.join(missing)}")
    try:
        return [{column: float(row[column]) for column in HISTORY_COLUMNS} for row in rows]
    except (TypeError, ValueError) as error:
        raise ResultsError(f"{path}: not a number: {error}") from None


def unknown_or_fraction(value: object) -> bool:
    return value is None or (isinstance(value, float) and 0 <= value <= 1)


def read_recipe(path: Path, record: dict, recipes: Path) -> dict[str, object]:
    """The params of the recipe the run names (after checking its `set`), as `section.key` -> value."""
    try:
        recipe = load_recipe(record["recipe"], recipes)
    except ParamsError as error:
        raise ResultsError(f"{path}: recipe {record['recipe']!r}: {error}") from None
    extra = record.get("set", {})
    if not isinstance(extra, dict) or not all(re.fullmatch(r"(?!fetch\.)\w+\.\w+", key) for key in extra):
        raise ResultsError(f"{path}: 'set' must map section.key to a value (not fetch.*; seed has its own field)")
    return recipe


def check_original_script(path: Path, measured: object) -> None:
    """The original script's measurement, when the run records one: every field, of its type."""
    if measured is None:
        return
    if not isinstance(measured, dict):
        raise ResultsError(f"{path}: 'original_script' must be an object")
    for field, kind in ORIGINAL_SCRIPT.items():
        if not isinstance(measured.get(field), kind) or isinstance(measured.get(field), bool):
            raise ResultsError(f"{path}: original_script.{field} is missing or not a {kind.__name__}")


def read_run(path: Path, recipes: Path) -> Run:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ResultsError(f"{path}: not found") from None
    except json.JSONDecodeError as error:
        raise ResultsError(f"{path}: not valid JSON: {error}") from None
    if not isinstance(record, dict):
        raise ResultsError(f"{path}: expected a JSON object")
    for field, kinds in REQUIRED.items():
        if field not in record:
            raise ResultsError(f"{path}: missing field {field!r}")
        value = record[field]
        if not isinstance(value, kinds) or isinstance(value, bool):
            raise ResultsError(f"{path}: field {field!r} has the wrong type ({type(value).__name__})")
    if "knob" in record and not (isinstance(record["knob"], str) and record["based_on"]):
        raise ResultsError(f"{path}: 'knob' must be a string, and the run based_on the run it is compared with")
    if not unknown_or_fraction(record.get("val_served/accuracy")):
        raise ResultsError(f"{path}: 'val_served/accuracy' must be a fraction or null")
    if "commit" in record and not (
        isinstance(record["commit"], str) and re.fullmatch(r"[0-9a-f]{7,40}", record["commit"])
    ):
        raise ResultsError(f"{path}: 'commit' must be 7 to 40 hex digits (or absent: earlier code)")
    check_original_script(path, record.get("original_script"))
    if record["run"] != path.stem:
        raise ResultsError(f"{path}: field 'run' is {record['run']!r}, expected the file's name {path.stem!r}")
    history = None
    if record["history"] is not None:
        if "val/accuracy" in record:
            raise ResultsError(f"{path}: give either 'history' or 'val/accuracy', not both")
        history = read_history(path.parent / record["history"])
    else:
        values = record.get("val/accuracy")
        if not (isinstance(values, list) and values and all(map(unknown_or_fraction, values))):
            raise ResultsError(f"{path}: no 'history', so 'val/accuracy' must list each epoch's value (or null)")
    run = Run(record, read_recipe(path, record, recipes), history)
    seconds = record["epoch_seconds"]
    if seconds is not None and len(seconds) != run.epochs_run:
        raise ResultsError(f"{path}: {len(seconds)} epoch_seconds for {run.epochs_run} epochs")
    return run


def read_runs(results: Path, recipes: Path) -> dict[str, Run]:
    paths = sorted(results.glob("*.json"))
    if not paths:
        raise ResultsError(f"{results}: no result files (*.json)")
    runs = {path.stem: read_run(path, recipes) for path in paths}
    for run in runs.values():
        base = run.record["based_on"]
        if base is not None and base not in runs:
            raise ResultsError(f"{results / run.name}.json: based_on {base!r}, but there is no {base}.json")
        for field in ("beside", "proxy_of", "superseded_by"):
            other = run.record.get(field)
            if other is not None and other not in runs:
                raise ResultsError(f"{results / run.name}.json: {field} {other!r}, but there is no {other}.json")
        beside = run.record.get("beside")
        if beside is not None and runs[beside].record.get("original_script") is None:
            raise ResultsError(f"{results / run.name}.json: beside {beside!r}, which has no 'original_script'")
    return runs


# Formatting ---------------------------------------------------------------------------------------


def fixed(value: float | None, places: int = 3) -> str:
    """`value` rounded half up (0.7895 -> 0.790, as a person would), or "-" when unknown."""
    if value is None:
        return "-"
    return str(Decimal(repr(value)).quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_UP))


def ratio(value: float, reference: float) -> str:
    return f"{fixed(value / reference, 2)}x"


def yaml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def command(run: Run, defaults: dict[str, object]) -> str:
    """What runs the run's params again: `make pipeline` (params.yaml as it is), else `make recipe`,
    with EXP (the experiment's name, when it is not the recipe's: DVC refuses a name twice) and SET
    (seed, `set`)."""
    seed = {"seed": run.record["seed"]} if run.record["seed"] != defaults["seed"] else {}
    settings = " ".join(f"{key}={yaml_value(value)}" for key, value in (seed | run.record.get("set", {})).items())
    recipe = run.record["recipe"]
    if recipe == "original" and not settings:
        return "`make pipeline`"
    name = "" if run.name == recipe else f" EXP={run.name}"
    return f"`make recipe NAME={recipe}{name}" + (f' SET="{settings}"`' if settings else "`")


def seconds(run: Run) -> str:
    """Total train-stage seconds, and what else ran meanwhile."""
    values = run.record["epoch_seconds"]
    if values is None:
        return "not recorded"
    return f"{sum(values)}" + (f" ({run.record['timing']})" if run.record["timing"] else "")


def code(run: Run) -> str:
    """The commit the run ran, or "earlier code" (no commit recorded), with the run's date."""
    commit = run.record.get("commit")
    return f"`{commit}`, {run.record['date']}" if commit else f"earlier code, {run.record['date']}"


def data(run: Run) -> str:
    md5 = run.record["archive_md5"]
    return ARCHIVES.get(md5, f"archive md5 {md5}")


def ran_on(run: Run) -> str:
    """Code, data and machine of the run."""
    return f"{code(run)}; {data(run)}; {run.record['machine']}"


def need(runs: dict[str, Run], name: str) -> Run:
    if name not in runs:
        raise ResultsError(f"docs/results/{name}.json: not found (a table shows this run)")
    return runs[name]


def originals(runs: dict[str, Run]) -> list[Run]:
    """The runs of the original recipe (params.yaml as it is), newest first."""
    return sorted(
        (run for run in runs.values() if run.record["recipe"] == "original"),
        key=lambda run: run.record["date"],
        reverse=True,
    )


def original_script(runs: dict[str, Run]) -> tuple[Run, dict]:
    """The run of the defaults that the original script was timed beside, and that measurement."""
    run = need(runs, CURRENT_ORIGINAL)
    if run.record.get("original_script") is None:
        raise ResultsError(f"docs/results/{CURRENT_ORIGINAL}.json: no 'original_script' measurement")
    if run.record["epoch_seconds"] is None or run.record["pipeline_seconds"] is None:
        raise ResultsError(f"docs/results/{CURRENT_ORIGINAL}.json: the comparison needs its seconds")
    return run, run.record["original_script"]


def seed_groups(runs: dict[str, Run]) -> dict[tuple, dict[int, Run]]:
    """Finished runs by their params other than the seed (recipe and `set`): one run a seed (a
    rerun of the same seed counts once)."""
    groups: dict[tuple, dict[int, Run]] = {}
    for run in sorted(runs.values(), key=lambda run: run.name):
        if run.record["test/accuracy"] is None or run.epochs_run != run.record["epochs"]:
            continue
        key = (run.record["recipe"], tuple(sorted(run.record.get("set", {}).items())))
        groups.setdefault(key, {}).setdefault(run.record["seed"], run)
    return groups


def same_params(runs: dict[str, Run], run: Run) -> list[Run]:
    """The runs of `run`'s params, one a seed, by seed."""
    by_seed = seed_groups(runs)[(run.record["recipe"], tuple(sorted(run.record.get("set", {}).items())))]
    return [by_seed[seed] for seed in sorted(by_seed)]


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# Tables -------------------------------------------------------------------------------------------


def recipes_table(runs: dict[str, Run], defaults: dict) -> str:
    """Every full-length run (params.yaml's epochs; the shorter ones are in the proxy, search and
    time tables) but the superseded ones and those that set a knob on top of a recipe (the search
    table's): the original recipe's newest (the older ones stay in their files), then finished runs
    by test accuracy, then stopped ones."""
    others = sorted(
        (
            run
            for run in runs.values()
            if run.record["recipe"] != "original"
            and run.record["epochs"] == defaults["train.epochs"]
            and not ("knob" in run.record and "set" in run.record)
            and "superseded_by" not in run.record
        ),
        key=lambda run: (run.record["test/accuracy"] is None, -(run.record["test/accuracy"] or 0), run.name),
    )
    rows = []
    for run in originals(runs)[:1] + others:
        stopped = (
            ""
            if run.epochs_run == run.record["epochs"]
            else f" (epoch {run.epochs_run} of {run.record['epochs']}, stopped)"
        )
        rows.append(
            [
                f"`{run.name}`",
                fixed(run.validation_accuracy[-1]) + stopped,
                "not evaluated" if run.record["test/accuracy"] is None else fixed(run.record["test/accuracy"]),
                seconds(run),
                ran_on(run),
                command(run, defaults),
            ]
        )
    header = ["run", "validation accuracy", "test accuracy", "train-stage seconds", "code, data, machine"]
    return table([*header, "command"], rows)


def original_epochs_table(runs: dict[str, Run], defaults: dict) -> str:
    run = need(runs, CURRENT_ORIGINAL)
    if run.history is None:
        raise ResultsError(f"{CURRENT_ORIGINAL}.json names no history")
    seconds = run.record["epoch_seconds"] or [None] * run.epochs_run
    rows = [
        [str(int(row["epoch"])), *(fixed(row[column]) for column in HISTORY_COLUMNS[1:]), str(second)]
        for row, second in zip(run.history, seconds, strict=True)
    ]
    return table(["epoch", "train accuracy", "train loss", "validation accuracy", "validation loss", "seconds"], rows)


def original_runs_table(runs: dict[str, Run], defaults: dict) -> str:
    rows = [
        [
            ran_on(run),
            ", ".join(fixed(value) for value in run.validation_accuracy),
            fixed(run.record["test/accuracy"]),
            fixed(run.record["test/loss"]),
        ]
        for run in originals(runs)
    ]
    return table(["code, data, machine", "validation accuracy after each epoch", "test accuracy", "test loss"], rows)


def readme_table(runs: dict[str, Run], defaults: dict) -> str:
    """The original recipe at the current defaults against the recommended one: each a run at a
    named commit; the recommended one's test accuracy also over its seeds."""
    rows = []
    for label, name in [
        ("original (params.yaml)", CURRENT_ORIGINAL),
        (f"**{RECOMMENDED}** (recommended)", RECOMMENDED),
    ]:
        run = need(runs, name)
        if run.record["epoch_seconds"] is None or not run.record.get("commit"):
            raise ResultsError(f"docs/results/{name}.json: the README table needs its epoch_seconds and commit")
        test = fixed(run.record["test/accuracy"])
        seeds = same_params(runs, run)
        if len(seeds) > 1:
            spread = mean_and_spread([seed.record["test/accuracy"] for seed in seeds])
            test += f" ({spread} over seeds {', '.join(str(seed.record['seed']) for seed in seeds)})"
        rows.append(
            [
                label,
                fixed(run.validation_accuracy[-1]),
                test,
                f"{sum(run.record['epoch_seconds'])} s",
                ran_on(run),
                command(run, defaults),
            ]
        )
    header = ["recipe", "validation accuracy", "test accuracy", "training, 5 epochs", "code, data, machine"]
    return table([*header, "command"], rows)


def with_change(value: float | None, reference: float | None) -> str:
    """`value` and its change against `reference` ("0.799 (+0.015)"); `value` alone if either is unknown."""
    if value is None or reference is None:
        return fixed(value)
    return f"{fixed(value)} ({'+' if value >= reference else '-'}{fixed(abs(value - reference))})"


def search_table(runs: dict[str, Run], defaults: dict) -> str:
    """The runs that tried a knob: validation accuracy against the run they are based on (same
    seed), largest gain first, as served (test-time views; for a weight average, the saved
    weights, which the history does not see), and the time it took."""
    tried = []
    for run in (run for run in runs.values() if "knob" in run.record):
        base = need(runs, run.record["based_on"])
        tried.append((run.validation_accuracy[-1] - base.validation_accuracy[-1], run, base))
    rows = [
        [
            run.record["knob"],
            f"`{run.name}`",
            with_change(run.validation_accuracy[-1], base.validation_accuracy[-1]),
            f"`{base.name}`",
            str(run.record["seed"]),
            str(run.record["epochs"]),
            with_change(run.record.get("val_served/accuracy"), base.record.get("val_served/accuracy")),
            seconds(run),
            ran_on(run),
            command(run, defaults),
        ]
        for _, run, base in sorted(tried, key=lambda item: (-item[1].record["epochs"], -item[0], item[1].name))
    ]
    header = ["knob tried", "run", "validation accuracy (change)", "against", "seed", "epochs", "as served (change)"]
    return table([*header, "train-stage seconds", "code, data, machine", "command"], rows)


def proxy_table(runs: dict[str, Run], defaults: dict) -> str:
    """Each short run beside the full-length run of the same params, in the full-length runs' order."""
    pairs = [(runs[run.record["proxy_of"]], run) for run in runs.values() if "proxy_of" in run.record]
    rows = [
        [
            f"`{short.name}`",
            f"{fixed(short.validation_accuracy[-1])} after {short.epochs_run}",
            ran_on(short),
            f"`{full.name}`",
            f"{fixed(full.validation_accuracy[-1])} after {full.epochs_run}",
            ran_on(full),
        ]
        for full, short in sorted(pairs, key=lambda pair: (-pair[0].validation_accuracy[-1], pair[1].name))
    ]
    header = ["short run", "validation accuracy, epochs", "code, data, machine", "full-length run"]
    return table([*header, "validation accuracy, epochs", "code, data, machine"], rows)


def mean_and_spread(values: Sequence[float]) -> str:
    """`mean ± sample standard deviation`, 3 places; the mean alone for one value."""
    mean = sum(values) / len(values)
    if len(values) == 1:
        return fixed(mean)
    spread = (sum((value - mean) ** 2 for value in values) / (len(values) - 1)) ** 0.5
    return f"{fixed(mean)} ± {fixed(spread)}"


def seeds_table(runs: dict[str, Run], defaults: dict) -> str:
    """Each set of params run with more than one seed: mean and standard deviation over its seeds
    (one run a seed: a rerun of the same seed counts once), best mean test accuracy first."""
    rows = []
    for (recipe, extra), by_seed in seed_groups(runs).items():
        if len(by_seed) < 2:
            continue
        seeds = sorted(by_seed)
        chosen = [by_seed[seed] for seed in seeds]
        settings = " ".join(f"-S {key}={yaml_value(value)}" for key, value in extra)
        rows.append(
            (
                -sum(run.record["test/accuracy"] for run in chosen) / len(chosen),
                [
                    f"`recipes/{recipe}.yaml`" + (f" with `{settings}`" if settings else ""),
                    ", ".join(map(str, seeds)),
                    mean_and_spread([run.validation_accuracy[-1] for run in chosen]),
                    mean_and_spread([run.record["test/accuracy"] for run in chosen]),
                    ", ".join(f"`{run.name}` ({code(run)})" for run in chosen),
                ],
            )
        )
    rows.sort(key=lambda row: row[0])
    header = ["recipe", "seeds", "validation accuracy", "test accuracy", "runs (code)"]
    return table(header, [row for _, row in rows])


def original_script_table(runs: dict[str, Run], defaults: dict) -> str:
    """The original script against the pipeline at the defaults, timed one after the other."""
    run, script = original_script(runs)
    epochs = script["training_seconds"] + script["validation_seconds"]
    pipeline_rss = run.record.get("peak_rss_mb")
    rows = [
        [
            "the original script, as written",
            f"`{script['command']}`",
            f"{script['seconds']} s",
            f"{epochs} s",
            f"{script['peak_rss_mb']} MB",
            f"validation (on the test set) {fixed(script['val/accuracy'])}",
            f"not in this repository, {run.record['date']}; {data(run)}; {run.record['machine']}",
        ],
        [
            f"`{run.name}`",
            command(run, defaults),
            f"{run.record['pipeline_seconds']} s ({ratio(run.record['pipeline_seconds'], script['seconds'])})",
            f"{sum(run.record['epoch_seconds'])} s ({ratio(sum(run.record['epoch_seconds']), epochs)})",
            "-" if pipeline_rss is None else f"{pipeline_rss} MB ({ratio(pipeline_rss, script['peak_rss_mb'])})",
            f"test {fixed(run.record['test/accuracy'])}",
            ran_on(run),
        ],
    ]
    header = ["run", "command", "whole run", "5 epochs with validation", "peak RSS", "accuracy after 5 epochs"]
    return table([*header, "code, data, machine"], rows)


def time_to_accuracy_table(runs: dict[str, Run], defaults: dict) -> str:
    """When each run first validates at the original recipe's test accuracy, against the original
    script's time for 5 epochs measured on the same machine, one run after the other: the run that holds
    that measurement and the runs `beside` it, newest measurement first."""
    target = need(runs, CURRENT_ORIGINAL).record["test/accuracy"]
    references = sorted(
        (run for run in runs.values() if run.record.get("original_script") is not None),
        key=lambda run: run.record["date"],
        reverse=True,
    )
    rows = []
    for reference in references:
        script = reference.record["original_script"]["seconds"]
        beside = sorted((run for run in runs.values() if run.record.get("beside") == reference.name), key=Run.sort_key)
        for run in [reference, *beside]:
            passed = next(
                (epoch for epoch, value in enumerate(run.validation_accuracy) if value and value >= target), None
            )
            if passed is None or run.record["epoch_seconds"] is None:
                continue
            spent = sum(run.record["epoch_seconds"][: passed + 1])
            whole = run.record["pipeline_seconds"]
            rows.append(
                [
                    f"`{run.name}`",
                    f"{passed + 1} of {run.record['epochs']} ({fixed(run.validation_accuracy[passed])})",
                    f"{spent} ({ratio(spent, script)} of {script} s)",
                    "-" if whole is None else f"{whole} s ({ratio(whole, script)})",
                    fixed(run.record["test/accuracy"]),
                    f"{run.record['timing'] or '-'}",
                    ran_on(run),
                ]
            )
    header = [
        "run",
        f"epoch whose validation accuracy passes {fixed(target)}",
        "train-stage seconds by then (of the original script's, same machine)",
        "whole run",
        "test accuracy after the last epoch",
        "load",
        "code, data, machine",
    ]
    return table(header, rows)


TABLES: dict[str, Callable[[dict[str, Run], dict], str]] = {
    "readme": readme_table,
    "recipes": recipes_table,
    "original-epochs": original_epochs_table,
    "original-runs": original_runs_table,
    "search": search_table,
    "seeds": seeds_table,
    "original-script": original_script_table,
    "time-to-accuracy": time_to_accuracy_table,
    "proxy": proxy_table,
}


# Pages --------------------------------------------------------------------------------------------


def pages(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def render(text: str, page: Path, runs: dict[str, Run], defaults: dict) -> str:
    """`text` with each table between its markers (at the start of a line, outside code blocks) rendered."""

    def replace(match: re.Match) -> str:
        name = match["name"]
        if name not in TABLES:
            raise ResultsError(f"{page}: unknown table {name!r} (known: {', '.join(TABLES)})")
        return match.group(1) + TABLES[name](runs, defaults) + match.group(4)

    parts = CODE.split(text)  # odd items are code blocks, left as they are
    for index in range(0, len(parts), 2):
        part = parts[index]
        opened = len(re.findall(r"^<!-- table:", part, re.MULTILINE))
        closed = len(re.findall(r"^<!-- /table -->", part, re.MULTILINE))
        if opened != closed or opened != len(MARKER.findall(part)):
            raise ResultsError(f"{page}: every <!-- table:NAME --> needs its own <!-- /table --> after it")
        parts[index] = MARKER.sub(replace, part)
    return "".join(parts)


def main(argv: Sequence[str] | None = None, root: Path = ROOT) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a page is out of date")
    arguments = parser.parse_args(argv)
    try:
        runs = read_runs(root / "docs" / "results", root / "recipes")
        defaults = load_params(root / "params.yaml").flat()  # `seed` and `section.key` -> value
        stale = []
        for page in pages(root):
            text = page.read_text(encoding="utf-8")
            rendered = render(text, page, runs, defaults)
            if rendered == text:
                continue
            stale.append(page)
            if arguments.check:
                logger.error("%s: tables out of date; run python docs/tables.py", page.relative_to(root))
            else:
                page.write_text(rendered, encoding="utf-8")
                logger.info("%s: tables rewritten", page.relative_to(root))
    except (ResultsError, ParamsError) as error:
        logger.error("%s", error)
        return 2
    if not stale:
        logger.info("all tables up to date")
    return 1 if stale and arguments.check else 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main())
