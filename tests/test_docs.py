"""The README's recipes figure can be redrawn from the committed histories, and bad arguments stop it cleanly."""

from __future__ import annotations

import pytest

from helpers import PROJECT_ROOT, load_script

RESULTS = PROJECT_ROOT / "docs" / "results"


def load_recipes_figure():
    return load_script("docs/figures/recipes_figure.py")


def test_the_figure_is_drawn_from_every_committed_history(tmp_path):
    histories = sorted(RESULTS.glob("*_history.csv"))
    if not histories:
        raise AssertionError(f"no histories in {RESULTS}")
    out = tmp_path / "recipes.png"
    load_recipes_figure().main([str(out)] + [f"{path.name.removesuffix('_history.csv')}={path}" for path in histories])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [path.name for path in tmp_path.iterdir()] == ["recipes.png"]  # no temporary file left


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
