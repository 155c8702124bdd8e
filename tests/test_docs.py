"""The docs: figures and tables are redrawn from the committed results (bad files stop the scripts cleanly),
the README stays short and says what a run costs before its first command, results name the code,
data and machine they came from, one recipe is recommended everywhere, the pages describe the
project (no diary), links between the pages resolve, and no tracked file holds a path of the
development machines."""

from __future__ import annotations

import ast
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import PROJECT_ROOT, load_script
from matplotlib.testing.compare import compare_images

RESULTS = PROJECT_ROOT / "docs" / "results"
RECIPES = PROJECT_ROOT / "recipes"
FIGURES = PROJECT_ROOT / "docs" / "figures"
PAGES = [PROJECT_ROOT / "README.md", *sorted((PROJECT_ROOT / "docs").glob("*.md"))]


def load_recipes_figure():
    return load_script("docs/figures/recipes_figure.py")


def load_tables():
    return load_script("docs/tables.py")


def history(name: str) -> str:
    return str(RESULTS / f"{name}_history.csv")


# Figures ------------------------------------------------------------------------------------------


def test_the_figure_is_drawn_from_every_committed_history(tmp_path):
    histories = sorted(RESULTS.glob("*_history.csv"))
    if not histories:
        raise AssertionError(f"no histories in {RESULTS}")
    out = tmp_path / "recipes.png"
    load_recipes_figure().main([str(out)] + [f"{path.name.removesuffix('_history.csv')}={path}" for path in histories])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [path.name for path in tmp_path.iterdir()] == ["recipes.png"]  # no temporary file left


def redraw_commands() -> dict[str, list[str]]:
    """docs/figures/redraw.sh's commands by figure: recipes_figure.py's arguments, history paths made
    absolute (the script runs from the project root)."""
    text = (FIGURES / "redraw.sh").read_text().replace("\\\n", " ")
    commands = {}
    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        if words[:2] != ["python", "docs/figures/recipes_figure.py"]:
            continue
        arguments = [
            f"{argument.partition('=')[0]}={PROJECT_ROOT / argument.partition('=')[2]}"
            if "=" in argument and not argument.startswith("--")
            else argument
            for argument in words[2:]
        ]
        out = next(argument for argument in arguments if argument.endswith(".png"))
        commands[Path(out).name] = arguments
    return commands


COMMITTED_FIGURES = redraw_commands()
FIGURE_TOLERANCE = 2.0


@pytest.mark.parametrize("figure", COMMITTED_FIGURES)
def test_each_committed_figure_is_redrawn_from_the_histories(tmp_path, figure):
    arguments = [
        str(tmp_path / figure) if argument.endswith(".png") else argument for argument in COMMITTED_FIGURES[figure]
    ]
    load_recipes_figure().main(arguments)
    # Pixels, not bytes: another FreeType or zlib draws the same lines a little differently. The
    # tolerance (RMS over 0-255) passes antialiasing and fails a moved or missing curve.
    difference = compare_images(str(FIGURES / figure), str(tmp_path / figure), tol=FIGURE_TOLERANCE)
    assert difference is None, f"{difference}: run docs/figures/redraw.sh ({figure})"


def test_every_committed_figure_is_redrawable():
    assert sorted(path.name for path in FIGURES.glob("*.png")) == sorted(COMMITTED_FIGURES)


@pytest.mark.parametrize(
    ("argument", "message"),
    [
        ("recipe-lean", "expected NAME=HISTORY.csv, got 'recipe-lean'"),
        ("=history.csv", "expected NAME=HISTORY.csv"),
        ("recipe=missing_history.csv", "missing_history.csv not found"),
    ],
)
def test_a_bad_argument_names_the_problem_and_writes_nothing(tmp_path, capsys, argument, message):
    out = tmp_path / "recipes.png"
    good = f"original={RESULTS / 'original-defaults_history.csv'}"
    with pytest.raises(SystemExit) as stopped:
        load_recipes_figure().main([str(out), good, argument])
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_the_stage_figure_takes_exactly_one_history(tmp_path, capsys):
    out = tmp_path / "curves.png"
    with pytest.raises(SystemExit) as stopped:
        load_recipes_figure().main(["--stage", str(out), f"a={history('recipe-sgd')}", f"b={history('recipe-lean')}"])
    assert stopped.value.code == 2
    assert "--stage draws one run, got 2" in capsys.readouterr().err
    assert not out.exists()


# Tables -------------------------------------------------------------------------------------------


def test_the_tables_in_the_docs_are_those_the_result_files_give():
    assert load_tables().main(["--check"]) == 0, "run: python docs/tables.py"


@pytest.fixture
def docs_copy(tmp_path):
    """A copy of what docs/tables.py reads, with one page holding every table."""
    shutil.copytree(RESULTS, tmp_path / "docs" / "results")
    shutil.copytree(RECIPES, tmp_path / "recipes")
    shutil.copy(PROJECT_ROOT / "params.yaml", tmp_path / "params.yaml")
    tables = load_tables().TABLES
    (tmp_path / "README.md").write_text("".join(f"<!-- table:{name} -->\n<!-- /table -->\n\n" for name in tables))
    return tmp_path


def test_check_reports_a_stale_page_and_the_script_rewrites_it(docs_copy, caplog):
    tables = load_tables()
    readme = docs_copy / "README.md"
    assert tables.main(["--check"], root=docs_copy) == 1
    assert "README.md: tables out of date" in caplog.text
    assert "| recipe |" not in readme.read_text()  # --check changes nothing
    assert tables.main([], root=docs_copy) == 0
    text = readme.read_text()
    assert "| original (params.yaml) | 0.579 | 0.574 | 965 s | `4eb6d39`, 2026-11-30; JPEG copy;" in text
    assert "| **recipe-sgd-plus** (recommended) | 0.799 | 0.801 (0.801 ± 0.001 over seeds 1, 7, 42) | 601 s |" in text
    assert tables.main(["--check"], root=docs_copy) == 0
    readme.write_text(text.replace("0.799", "0.798"))
    assert tables.main(["--check"], root=docs_copy) == 1


def test_markers_in_code_blocks_are_examples_and_left_alone(docs_copy):
    tables = load_tables()
    readme = docs_copy / "README.md"
    example = "```\n<!-- table:recipes -->\n...generated...\n<!-- /table -->\n```\n"
    readme.write_text(readme.read_text() + example)
    assert tables.main([], root=docs_copy) == 0
    assert readme.read_text().endswith(example)


def _edit_json(path, drop=(), **changes):
    record = json.loads(path.read_text()) | changes
    for key in drop:
        del record[key]
    path.write_text(json.dumps(record))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda results: (results / "recipe-sgd.json").write_text("{not json"), "recipe-sgd.json: not valid JSON"),
        (
            lambda results: _edit_json(results / "recipe-sgd.json", drop=["test/accuracy"]),
            "recipe-sgd.json: missing field 'test/accuracy'",
        ),
        (
            lambda results: _edit_json(results / "recipe-sgd.json", seed="42"),
            "recipe-sgd.json: field 'seed' has the wrong type (str)",
        ),
        (lambda results: _edit_json(results / "recipe-sgd.json", run="recipe-x"), "field 'run' is 'recipe-x'"),
        (
            lambda results: _edit_json(results / "recipe-sgd.json", drop=["recipe"]),
            "recipe-sgd.json: missing field 'recipe'",
        ),
        (lambda results: _edit_json(results / "recipe-sgd.json", set={"dropout": 0.0}), "'set' must map section.key"),
        (
            lambda results: _edit_json(results / "recipe-sgd.json", set={"fetch.md5": "0" * 32}),
            "'set' must map section.key",
        ),
        (lambda results: _edit_json(results / "recipe-sgd.json", epoch_seconds=[1, 2]), "2 epoch_seconds for 5 epochs"),
        (lambda results: (results / "recipe-lean_history.csv").unlink(), "recipe-lean_history.csv: not found"),
        (
            lambda results: (results / "recipe-lean_history.csv").write_text("epoch,train/accuracy\n1,0.5\n"),
            "missing column(s) train/loss, val/accuracy, val/loss",
        ),
        (
            lambda results: (results / "original-defaults-2026-11-30.json").unlink(),
            "but there is no original-defaults-2026-11-30.json",
        ),
        (lambda results: _edit_json(results / "recipe-flip.json", based_on="recipe-none"), "based_on 'recipe-none'"),
        (
            lambda results: _edit_json(results / "recipe-flip.json", commit="HEAD"),
            "'commit' must be 7 to 40 hex digits",
        ),
        (
            lambda results: _edit_json(results / "recipe-sgd-plus.json", drop=["commit"]),
            "recipe-sgd-plus.json: the README table needs its epoch_seconds and commit",
        ),
        (
            lambda results: _edit_json(results / "original-defaults-2026-11-30.json", original_script={"seconds": 1}),
            "original_script.command is missing or not a str",
        ),
        (
            lambda results: _edit_json(results / "original-defaults-2026-11-30.json", drop=["original_script"]),
            "beside 'original-defaults-2026-11-30', which has no 'original_script'",
        ),
        (
            lambda results: _edit_json(results / "recipe-sgd.json", beside="recipe-sgd-seed7"),
            "recipe-sgd.json: beside 'recipe-sgd-seed7', which has no 'original_script'",
        ),
        (
            lambda results: _edit_json(results / "recipe-sgd.json", proxy_of="recipe-sgd-long"),
            "recipe-sgd.json: proxy_of 'recipe-sgd-long', but there is no recipe-sgd-long.json",
        ),
        (
            lambda results: _edit_json(results / "recipe-lean.json", superseded_by="recipe-sgdd"),
            "recipe-lean.json: superseded_by 'recipe-sgdd', but there is no recipe-sgdd.json",
        ),
        (
            lambda results: (results.parent.parent / "README.md").write_text(
                "<!-- table:nothing -->\n<!-- /table -->\n"
            ),
            "unknown table 'nothing'",
        ),
        (
            lambda results: (results.parent.parent / "README.md").write_text("<!-- table:readme -->\n"),
            "needs its own <!-- /table -->",
        ),
    ],
)
def test_a_missing_or_malformed_file_is_named_and_nothing_is_written(docs_copy, caplog, damage, message):
    damage(docs_copy / "docs" / "results")
    readme = (docs_copy / "README.md").read_text()
    assert load_tables().main([], root=docs_copy) == 2
    assert message in caplog.text
    assert (docs_copy / "README.md").read_text() == readme


@pytest.mark.parametrize(
    ("damage", "run", "recipe"),
    [
        (
            lambda root: _edit_json(root / "docs/results/recipe-flip.json", recipe="recipe-flipped"),
            "recipe-flip",
            "recipe-flipped",
        ),
        (lambda root: (root / "recipes/recipe-lean.yaml").unlink(), "recipe-lean", "recipe-lean"),
    ],
    ids=["the-result-names-no-such-recipe", "the-recipe-file-is-gone"],
)
def test_a_result_naming_a_missing_recipe_is_named_and_nothing_is_written(docs_copy, caplog, damage, run, recipe):
    damage(docs_copy)
    readme = (docs_copy / "README.md").read_text()
    assert load_tables().main([], root=docs_copy) == 2
    assert f"{run}.json: recipe {recipe!r}: {docs_copy}/recipes/{recipe}.yaml: no such recipe" in caplog.text
    assert (docs_copy / "README.md").read_text() == readme


def test_a_run_may_set_params_on_top_of_its_recipe(docs_copy):
    """recipe-sgd-lr01 written as recipe-sgd with `set`: the same params, run with SET, under its own
    name (EXP): DVC refuses an experiment name twice."""
    tables = load_tables()
    _edit_json(docs_copy / "docs/results/recipe-sgd-lr01.json", recipe="recipe-sgd", set={"train.learning_rate": 0.1})
    assert tables.main([], root=docs_copy) == 0
    rows = {line.split(" | ")[0]: line for line in generated_table(docs_copy / "README.md", "recipes")}
    assert rows["| `recipe-sgd-lr01`"].endswith(
        '| `make recipe NAME=recipe-sgd EXP=recipe-sgd-lr01 SET="train.learning_rate=0.1"` |'
    )
    assert rows["| `recipe-sgd-seed7`"].endswith('| `make recipe NAME=recipe-sgd EXP=recipe-sgd-seed7 SET="seed=7"` |')
    assert rows["| `recipe-sgd-rerun`"].endswith("| `make recipe NAME=recipe-sgd EXP=recipe-sgd-rerun` |")


def test_the_recipes_table_leaves_out_superseded_runs_and_knobs_set_on_a_recipe(docs_copy):
    tables = load_tables()
    _edit_json(docs_copy / "docs/results/recipe-sgd-lr01.json", superseded_by="recipe-sgd")
    assert tables.main([], root=docs_copy) == 0
    listed = {line.split(" | ")[0] for line in generated_table(docs_copy / "README.md", "recipes")}
    assert "| `recipe-sgd`" in listed and "| `recipe-sgd-plus`" in listed  # recipe-sgd-plus is a knob, not set
    assert "| `recipe-sgd-lr01`" not in listed and "| `recipe-lean`" not in listed
    assert "| `recipe-sgd-crop2`" not in listed  # in the search table
    assert any("`recipe-sgd-crop2`" in line for line in generated_table(docs_copy / "README.md", "search"))


def test_seeds_table_gives_mean_and_spread_over_seeds_counting_a_rerun_once(docs_copy):
    """recipe-sgd ran with seeds 42 (twice: recipe-sgd and recipe-sgd-rerun) and 7."""
    tables = load_tables()
    assert tables.main([], root=docs_copy) == 0
    rows = {line.split(" | ")[0]: line for line in (docs_copy / "README.md").read_text().splitlines()}
    # validation 0.7838 and 0.7764, test 0.7895 and 0.786: sample standard deviations 0.0052 and 0.0025
    assert rows["| `recipes/recipe-sgd.yaml`"] == (
        "| `recipes/recipe-sgd.yaml` | 7, 42 | 0.780 ± 0.005 | 0.788 ± 0.002 | "
        "`recipe-sgd-seed7` (earlier code, 2026-11-29), `recipe-sgd` (earlier code, 2026-11-29) |"
    )


def test_search_table_gives_a_knobs_change_against_the_run_it_is_based_on(docs_copy, caplog):
    tables = load_tables()
    _edit_json(docs_copy / "docs/results/recipe-sgd-lr01.json", based_on="recipe-sgd", knob="peak rate 0.1")
    assert tables.main([], root=docs_copy) == 0
    rows = {line.split(" | ")[0]: line for line in (docs_copy / "README.md").read_text().splitlines()}
    # validation 0.781 against recipe-sgd's 0.7838, the same seed; its train-stage seconds and their load
    assert rows["| peak rate 0.1"] == (
        "| peak rate 0.1 | `recipe-sgd-lr01` | 0.781 (-0.003) | `recipe-sgd` | 42 | 5 | - | 1371 (another training on "
        "the same cores) | earlier code, 2026-11-29; "
        "JPEG copy; AMD EPYC, AVX512_BF16 | `make recipe NAME=recipe-sgd-lr01` |"
    )
    # as served: 0.808 against recipe-sgd-plus's 0.8092 (a weight average shows only there)
    assert "| `recipe-sgd-plus-b32` | 0.800 (+0.001) | `recipe-sgd-plus` | 42 | 5 | 0.808 (-0.001) |" in "\n".join(
        rows.values()
    )
    _edit_json(docs_copy / "docs/results/recipe-sgd-lr01.json", based_on=None)
    assert tables.main([], root=docs_copy) == 2
    assert "recipe-sgd-lr01.json: 'knob' must be a string, and the run based_on" in caplog.text


def test_time_to_accuracy_compares_each_run_with_the_original_script_timed_beside_it(docs_copy):
    """recipe-sgd's runs timed against a measurement of the original script held by recipe-sgd: each
    row's time is a fraction of that measurement, not of another machine's."""
    tables = load_tables()
    script = json.loads((RESULTS / "original-defaults-2026-11-30.json").read_text())["original_script"]
    _edit_json(docs_copy / "docs/results/recipe-sgd.json", original_script=script | {"seconds": 2000})
    _edit_json(docs_copy / "docs/results/recipe-sgd-seed7.json", beside="recipe-sgd")
    assert tables.main([], root=docs_copy) == 0
    rows = {line.split(" | ")[0]: line for line in generated_table(docs_copy / "README.md", "time-to-accuracy")}
    # validation 0.615 after epoch 2 of recipe-sgd (321 + 275 s), 0.574 is the original recipe's test accuracy
    assert rows["| `recipe-sgd`"].startswith("| `recipe-sgd` | 2 of 5 (0.615) | 596 (0.30x of 2000 s) | - | 0.790 |")
    assert "of 2000 s" in rows["| `recipe-sgd-seed7`"]
    assert "(0.18x of 1325 s)" in rows["| `recipe-sgd-plus`"]


@pytest.mark.parametrize("path", sorted(RESULTS.glob("*.json")), ids=lambda path: path.stem)
def test_each_result_file_holds_valid_params(path):
    """The run's params are params.yaml + its recipe + its `set` + its seed: what `make recipe` runs, and valid."""
    from alexnet8.recipe import checked_overrides, load_recipe

    record = json.loads(path.read_text())
    assert (RECIPES / f"{record['recipe']}.yaml").is_file(), f"{path.name}: no recipes/{record['recipe']}.yaml"
    overrides = load_recipe(record["recipe"], RECIPES) | record.get("set", {}) | {"seed": record["seed"]}
    checked_overrides(overrides, PROJECT_ROOT / "params.yaml", source=f"{path.name}: recipe {record['recipe']}")


# Pages --------------------------------------------------------------------------------------------


def test_the_pages_stay_within_their_size_budgets():
    readme = len((PROJECT_ROOT / "README.md").read_bytes())
    docs = sum(len(page.read_bytes()) for page in (PROJECT_ROOT / "docs").glob("*.md"))
    assert readme <= 12_288, f"README.md is {readme} bytes, the budget is 12,288"
    assert docs < 99_463, f"docs/*.md total {docs} bytes, the budget is under 99,463"


LINK = re.compile(r"\]\(([^)\s]+)\)")
CODE = re.compile(r"^```.*?^```", re.DOTALL | re.MULTILINE)


def anchors(page) -> set[str]:
    """GitHub's anchors for the page's headings: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+ (.+)$", CODE.sub("", page.read_text()), re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_every_relative_link_points_to_a_file_and_heading(page):
    broken = []
    for target in LINK.findall(CODE.sub("", page.read_text())):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: no such heading")
    assert not broken, f"{page.name}: {broken}"


def test_no_development_machine_paths_in_tracked_files():
    """Docs and code say /path/to/..., never where files were on the machines this was developed on."""
    # Built in pieces, so that this file does not match itself.
    leak = re.compile("/" + "work/" + "|" + r"\.\./" + "shared/" + "|" + "shared" + "/(bench|data|reference|hooks)")
    try:
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=PROJECT_ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    found = []
    for name in filter(None, listed.decode().split("\0")):
        path = PROJECT_ROOT / name
        if name == "requirements.lock" or not path.is_file():
            continue
        content = path.read_bytes()
        if b"\0" in content:  # binary: the figures
            continue
        for number, line in enumerate(content.decode("utf-8", "replace").splitlines(), 1):
            if leak.search(line):
                found.append(f"{name}:{number}: {line.strip()}")
    assert not found, "paths of the development machines (write /path/to/... instead):\n" + "\n".join(found)


README = PROJECT_ROOT / "README.md"
RECIPE_FILES = sorted(RECIPES.glob("*.yaml"))


def generated_table(page: Path, name: str) -> list[str]:
    """The data rows of the table `name` as generated in `page`."""
    match = re.search(rf"^<!-- table:{name} -->\n(.*?)^<!-- /table -->", page.read_text(), re.DOTALL | re.MULTILINE)
    assert match, f"{page.name}: no table {name}"
    return match.group(1).splitlines()[2:]


def test_the_readme_says_what_a_run_costs_before_its_first_command():
    text = README.read_text()
    before = text[: text.index("```bash")]
    costs = {
        "time of make setup": r"`make setup`: \d+ minutes",
        "time of make pipeline": r"`make pipeline`: about \d+ minutes",
        "disk": r"\| disk \| [^\n]*\d(\.\d)? GB",
        "memory": r"\| memory \| [^\n]*\d(\.\d)? GB at the peak",
        "network": r"\| network \| [^\n]*package index[^\n]*163 MB archive",
        "GPU": r"GPU is optional",
        "make test": r"\| `make test` \| about \d+ minutes[^\n]*PostgreSQL[^\n]*S3[^\n]*MLflow server",
    }
    missing = [cost for cost, pattern in costs.items() if not re.search(pattern, before)]
    assert not missing, f"README: say before the first command: {missing}"


RECOMMENDED = "recipe-sgd-plus"
RECOMMENDATION = re.compile(
    r"recommended recipe(?: is)?[,:]?\s*\**`?(recipe-[\w-]+)|(recipe-[\w-]+)`?\**\s*\(recommended\)", re.IGNORECASE
)


def test_one_recipe_is_recommended_wherever_a_page_or_recipe_file_recommends_one():
    named: dict[str, set[str]] = {}
    for path in [*PAGES, *RECIPE_FILES]:
        text = path.read_text()
        named[path.name] = {first or second for first, second in RECOMMENDATION.findall(text.replace("\n# ", " "))}
        for line in text.splitlines():
            if "recommend" in line.lower() and re.search(r"\brecipe-[\w-]+", line):
                assert RECOMMENDED in line, f"{path.name}: recommends without naming {RECOMMENDED}: {line}"
        for phrase in re.finditer("recommended recipe", text, re.IGNORECASE):
            after = text[phrase.end() : phrase.end() + 100]
            assert RECOMMENDED in after, f"{path.name}: 'recommended recipe' not followed by {RECOMMENDED}: {after!r}"
    assert set().union(*named.values()) == {RECOMMENDED}
    assert all(named[name] for name in ["README.md", "results.md", f"{RECOMMENDED}.yaml"])
    assert (RECIPES / f"{RECOMMENDED}.yaml").read_text().startswith(f"# {RECOMMENDED} (recommended)")


def is_commit_of_this_history(commit: str) -> bool:
    merged = subprocess.run(
        ["git", "merge-base", "--is-ancestor", commit, "HEAD"], cwd=PROJECT_ROOT, capture_output=True
    )
    return merged.returncode == 0


def test_each_row_of_the_readme_results_names_a_commit_of_this_history_and_its_data_and_machine():
    if not (PROJECT_ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    rows = generated_table(README, "readme")
    assert rows
    for row in rows:
        commit = re.search(r"`([0-9a-f]{7,40})`, \d{4}-\d\d-\d\d; (JPEG copy|official archive); \w", row)
        assert commit, f"README results row names no commit, data and machine: {row}"
        assert is_commit_of_this_history(commit.group(1)), f"{commit.group(1)} is not a commit of this history"


@pytest.mark.parametrize(
    ("page", "table"),
    [
        ("results.md", "recipes"),
        ("results.md", "search"),
        ("results.md", "time-to-accuracy"),
        ("results.md", "proxy"),
        ("performance.md", "original-script"),
    ],
)
def test_each_result_row_in_the_docs_names_its_code_data_and_machine(page, table):
    code = r"(`[0-9a-f]{7,40}`|earlier code|not in this repository), \d{4}-\d\d-\d\d"
    for row in generated_table(PROJECT_ROOT / "docs" / page, table):
        assert re.search(rf"{code}; (JPEG copy|official archive); [\w ,]+(AVX|GPU)", row), row


# How a page would speak of the way the project was made rather than of the project.
DIARY = re.compile(
    r"\bsessions?\b|beside it|an hour earlier|before this was fixed|\bissue \d+|round two|seed_baseline|\bshared/",
    re.IGNORECASE,
)


@pytest.mark.parametrize("path", [*PAGES, *RECIPE_FILES], ids=lambda path: path.name)
def test_pages_describe_the_project_not_how_it_was_made(path):
    found = [line.strip() for line in path.read_text().splitlines() if DIARY.search(line)]
    assert not found, f"{path.name} reads as a diary: {found}"


def test_make_clean_exists_and_the_readme_says_what_it_removes_and_keeps():
    assert re.search(r"^clean:", (PROJECT_ROOT / "Makefile").read_text(), re.MULTILINE)
    text = README.read_text()
    section = text[text.index("## Clean up") :].split("\n## ")[0]
    for removed_or_kept in ["data/prepared/", "reports/", "checkpoints/", ".venv", "data/raw/", "mlflow.db", ".stack"]:
        assert removed_or_kept in section, f"README's Clean up says nothing of {removed_or_kept}"
    for command in ["make clean", "dvc exp remove", "dvc gc", "mlflow gc"]:
        assert command in section
    assert "[operations](docs/operations.md#errors)" in text[: text.index("## Results")], "troubleshooting link"


# The module map --------------------------------------------------------------------------------------


def _module_map() -> list[str]:
    """The modules of docs/development.md's map, in its order."""
    section = (PROJECT_ROOT / "docs/development.md").read_text().split("## Modules", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| `(\w+)` \|", section, re.MULTILINE)


def _imported_modules(path: Path) -> set[str]:
    """The alexnet8 modules `path` imports, wherever in it (functions import some lazily)."""
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "alexnet8":
            imported |= {node.module.split(".")[1]} if "." in node.module else {alias.name for alias in node.names}
        elif isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[1] for alias in node.names if alias.name.startswith("alexnet8.")}
    return imported - {path.stem}


def test_the_module_map_lists_every_module_once():
    modules = sorted(path.stem for path in (PROJECT_ROOT / "src/alexnet8").glob("*.py") if path.stem != "__init__")
    assert sorted(_module_map()) == modules


def test_each_module_imports_only_modules_above_it_in_the_map():
    order = _module_map()
    later = {
        module: sorted(
            imported
            for imported in _imported_modules(PROJECT_ROOT / f"src/alexnet8/{module}.py")
            if imported in order and order.index(imported) > order.index(module)
        )
        for module in order
    }
    assert {module: names for module, names in later.items() if names} == {}
