"""`python -m alexnet8.recipe NAME`: run a training recipe as a DVC experiment (`make recipe NAME=...`).

Reads: `recipes/NAME.yaml` (the params that differ from params.yaml, by section, as in
params.yaml), params.yaml as the last commit has it (what recipes are written against) and as the
workspace has it, to check that the recipe's keys and values are valid before anything runs.
Writes: nothing itself; it runs `dvc exp run -n NAME -S section.key=value ...`, which writes the
experiment (and its MLflow run) as any `dvc exp run` does. `dvc exp run` leaves the last
experiment's params in the workspace's params.yaml, so every key that differs there from the
commit (and is not the recipe's) is set back to its committed value, and logged.

A recipe is one file, read by this command, the tests and the docs alike, so what is documented
is what runs.
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

from alexnet8 import cli
from alexnet8.errors import ParamsError
from alexnet8.params import parse_params, parse_yaml, read_yaml, with_overrides

logger = logging.getLogger("alexnet8.recipe")  # also when run as `python -m alexnet8.recipe`

RECIPES_FOLDER = Path("recipes")


def recipe_names(folder: str | Path = RECIPES_FOLDER) -> list[str]:
    return sorted(path.stem for path in Path(folder).glob("*.yaml"))


def _flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    flat: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def load_recipe(name: str, folder: str | Path = RECIPES_FOLDER) -> dict[str, object]:
    """The recipe's params as `section.key` -> value, in file order. Raises ParamsError if there is none."""
    path = Path(folder) / f"{name}.yaml"
    if not path.is_file():
        available = ", ".join(recipe_names(folder)) or "none"
        raise ParamsError(f"{path}: no such recipe (available in {folder}/: {available})")
    tree = read_yaml(path)
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ParamsError(f"{path}: expected params by section, as in params.yaml; got {type(tree).__name__}")
    return _flatten(tree)


def parse_assignment(text: str) -> tuple[str, object]:
    """`section.key=value` (the value read as YAML, as `dvc exp run -S` does) -> (key, value)."""
    key, separator, value = text.partition("=")
    if not separator or not key:
        raise ParamsError(f"--set {text!r}: expected section.key=value")
    return key, yaml.safe_load(value)


def checked_overrides(overrides: dict[str, object], params_file: str | Path, source: str) -> dict[str, object]:
    """`overrides` after checking that params.yaml with them applied is valid; ParamsError names the bad keys."""
    parse_params(with_overrides(read_yaml(params_file), overrides), source=source)
    return overrides


def committed_params(params_file: str | Path) -> dict:
    """params.yaml as the last commit has it. Raises ParamsError if git cannot show it."""
    result = subprocess.run(["git", "show", f"HEAD:./{params_file}"], capture_output=True, text=True)
    if result.returncode != 0:
        raise ParamsError(
            f"{params_file}: not in the last commit ({result.stderr.strip()}); recipes run on the committed params"
        )
    return parse_yaml(result.stdout, source=f"{params_file} in the last commit")


def resets_to_committed(overrides: dict[str, object], workspace: dict, committed: dict) -> dict[str, object]:
    """The keys outside `overrides` whose workspace value differs from the committed one, with the
    committed value: what makes the experiment's params the committed params.yaml + the recipe."""
    current = _flatten(workspace)
    return {
        key: value
        for key, value in _flatten(committed).items()
        if key not in overrides and key in current and current[key] != value
    }


def _set_argument(key: str, value: object) -> str:
    # DVC parses `-S` values with Hydra's override grammar: YAML-like scalars, lowercase booleans.
    if isinstance(value, bool):
        return f"{key}={str(value).lower()}"
    return f"{key}={value}"


def exp_run_command(experiment: str, overrides: dict[str, object], queue: bool = False) -> list[str]:
    """The `dvc exp run` command line that runs `overrides` as the experiment named `experiment`."""
    command = ["dvc", "exp", "run", "-n", experiment, *(["--queue"] if queue else [])]
    for key, value in overrides.items():
        command += ["-S", _set_argument(key, value)]
    return command


def main(argv: Sequence[str] | None = None) -> None:
    argument_parser = cli.parser(__doc__.splitlines()[0])
    argument_parser.add_argument("recipe", nargs="?", help="recipe name: a file recipes/NAME.yaml")
    argument_parser.add_argument("--name", help="experiment name (default: the recipe's name)")
    argument_parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="a param on top of the recipe (repeatable)"
    )
    argument_parser.add_argument(
        "--queue", action="store_true", help="queue the experiment (`dvc queue start` runs it)"
    )
    argument_parser.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    argument_parser.add_argument("--recipes", default=str(RECIPES_FOLDER), help="recipes folder (default: recipes)")
    arguments = argument_parser.parse_args(argv)
    if not arguments.recipe:
        raise ParamsError(
            f"name a recipe: make recipe NAME=... (available: {', '.join(recipe_names(arguments.recipes))})"
        )

    overrides = load_recipe(arguments.recipe, arguments.recipes) | dict(map(parse_assignment, arguments.set))
    resets = resets_to_committed(overrides, read_yaml(arguments.params), committed_params(arguments.params))
    if resets:
        logger.info(
            "%s differs from the last commit in %s (an earlier experiment's or an edit): set back to %s",
            arguments.params,
            ", ".join(resets),
            ", ".join(_set_argument(key, value) for key, value in resets.items()),
        )
    overrides = resets | overrides
    checked_overrides(overrides, arguments.params, source=f"{arguments.params} with recipe {arguments.recipe}")
    command = exp_run_command(arguments.name or arguments.recipe, overrides, queue=arguments.queue)
    if arguments.dry_run:
        sys.stdout.write(shlex.join(command) + "\n")
        return
    logger.info("%s", shlex.join(command))
    logging.shutdown()
    os.execvp(command[0], command)  # DVC takes over the process: its output, exit status and Ctrl-C


if __name__ == "__main__":
    cli.run(main)
