"""`python tools/offline_plots.py`: the pages of `dvc plots show` / `dvc plots diff` load no
script from the network."""

from __future__ import annotations

import hashlib
import logging
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml
from helpers import PROJECT_ROOT, activated_environment, load_script

offline_plots = load_script("tools/offline_plots.py")
BUILDS, CONFIG_VALUE, PACKAGE = offline_plots.BUILDS, offline_plots.CONFIG_VALUE, offline_plots.PACKAGE
Build, OfflinePlotsError = offline_plots.Build, offline_plots.OfflinePlotsError
offline_template, with_html_template = offline_plots.offline_template, offline_plots.with_html_template

PREDICTIONS = "actual,predicted\n" + "".join(
    f"{actual},{predicted}\n"
    for actual, predicted in [
        ("cat", "cat"),
        ("cat", "dog"),
        ("dog", "dog"),
        ("dog", "dog"),
        ("ship", "ship"),
        ("ship", "cat"),
    ]
)


class _Scripts(HTMLParser):
    """Every <script> element of a page: its attributes and its text."""

    def __init__(self):
        super().__init__()
        self.scripts: list[tuple[dict[str, str | None], str]] = []
        self._inside: dict[str, str | None] | None = None
        self._text: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "script":
            self._inside, self._text = dict(attrs), []

    def handle_data(self, data):
        if self._inside is not None:
            self._text.append(data)

    def handle_endtag(self, tag):
        if tag == "script" and self._inside is not None:
            self.scripts.append((self._inside, "".join(self._text)))
            self._inside = None


def scripts_of(page: str) -> list[tuple[dict[str, str | None], str]]:
    parser = _Scripts()
    parser.feed(page)
    parser.close()
    return parser.scripts


def assert_needs_no_network(page_path: Path) -> None:
    """Every script of the page is inline, or a local file that exists."""
    scripts = scripts_of(page_path.read_text(encoding="utf-8"))
    assert scripts, f"{page_path} has no script"
    for attributes, _ in scripts:
        source = attributes.get("src")
        if source is None:
            continue
        assert not source.lower().startswith(("http://", "https://", "//")), f"{page_path} loads {source}"
        assert (page_path.parent / source).is_file(), f"{page_path} loads {source}, which does not exist"


@pytest.fixture(scope="module")
def sources() -> dict[str, bytes]:
    return offline_plots.read_sources()


def dvc_project(root: Path, local_config: str | None = None) -> Path:
    """A bare DVC project (`.dvc/config`, no git), with `.dvc/config.local` if given."""
    (root / ".dvc").mkdir(parents=True)
    (root / ".dvc" / "config").write_text("")
    if local_config is not None:
        (root / ".dvc" / "config.local").write_text(local_config)
    return root


def files_under(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def test_the_template_inlines_the_pinned_builds_in_load_order_and_drops_dvcs_cdn_tags(sources):
    from dvc_render import VegaRenderer
    from dvc_render.html import HTML

    template = offline_template(sources)
    scripts = scripts_of(template)
    assert [attributes.get("src") for attributes, _ in scripts] == [None, None, None]
    for (_, text), build in zip(scripts, BUILDS, strict=True):
        assert sources[build.resource].decode("utf-8").strip() in text
        assert f"{build.name} {build.version}" in text
    assert '<meta charset="utf-8">' in template  # the builds hold non-ASCII text
    assert "{scripts}" not in template
    # What dvc-render does with it: the CDN tags it adds for Vega plots have nowhere to go.
    page = HTML(template).with_scripts(VegaRenderer.SCRIPTS).with_element('<div id="plot"></div>').embed()
    assert "http" not in " ".join(str(attributes.get("src")) for attributes, _ in scripts_of(page))
    assert '<div id="plot"></div>' in page


def test_a_build_that_is_not_the_pinned_one_is_refused(sources):
    altered = dict(sources, **{BUILDS[1].resource: sources[BUILDS[1].resource] + b"\n"})
    with pytest.raises(
        OfflinePlotsError, match=rf"vega-lite5\.js from {PACKAGE} has sha256 .* expected {BUILDS[1].sha256}"
    ):
        offline_template(altered)
    with pytest.raises(OfflinePlotsError, match=r"vega5\.js \(vega 5\.33\.0\) is missing"):
        offline_template({})


@pytest.mark.parametrize(
    ("script", "message"),
    [
        (b"var s = '</SCRIPT>';", "can not be inlined"),
        (b"var s = '<!--';", "can not be inlined"),
        (b"var s = '{plot_divs}';", "DVC would replace it"),
        (b"var s = '\xff';", "not UTF-8"),
    ],
)
def test_a_script_that_would_break_the_page_is_refused(script, message):
    build = Build("x", "1.0.0", "x.js", hashlib.sha256(script).hexdigest())
    with pytest.raises(OfflinePlotsError, match=message):
        offline_template({"x.js": script}, builds=[build])


def test_setting_the_template_keeps_every_other_local_setting():
    from configobj import ConfigObj

    before = (
        "# credentials for the team's remote\n"
        "['remote \"storage\"']\n"
        "    url = s3://bucket/path\n"
        "    access_key_id = AKIA\n"
        "[core]\n"
        "    remote = storage\n"
        "[Plots]\n"
        "    auto_open = true\n"
        "    HTML_template = old.html\n"
    )
    after = with_html_template(before, CONFIG_VALUE)
    assert after.startswith("# credentials for the team's remote\n")
    assert ConfigObj(after.splitlines()).dict() == {
        'remote "storage"': {"url": "s3://bucket/path", "access_key_id": "AKIA"},
        "core": {"remote": "storage"},
        "Plots": {"auto_open": "true", "html_template": CONFIG_VALUE},
    }
    assert with_html_template("", CONFIG_VALUE) == f"[plots]\nhtml_template = {CONFIG_VALUE}\n"


def test_a_project_is_configured_once_and_a_second_run_changes_nothing(tmp_path):
    from dvc.config import Config

    root = dvc_project(
        tmp_path / "project",
        "['remote \"storage\"']\n    url = ssh://user@example.invalid/storage\n    password = secret\n",
    )
    (root / ".dvc" / "config.local").chmod(0o600)
    (root / "sub").mkdir()

    offline_plots.main(["--repo", str(root / "sub")])  # found from inside, as dvc finds it

    template = root / ".dvc" / CONFIG_VALUE
    assert template.read_text(encoding="utf-8") == offline_template(offline_plots.read_sources())
    config = Config(dvc_dir=str(root / ".dvc"))
    assert config["plots"]["html_template"] == CONFIG_VALUE
    assert config["remote"]["storage"]["password"] == "secret"
    assert (root / ".dvc" / "config.local").stat().st_mode & 0o777 == 0o600  # may hold credentials
    written = files_under(root)
    assert sorted(written) == [".dvc/config", ".dvc/config.local", f".dvc/{CONFIG_VALUE}"]  # no temporary left
    modified = {path: path.stat().st_mtime_ns for path in (template, root / ".dvc" / "config.local")}

    offline_plots.main(["--repo", str(root)])

    assert files_under(root) == written
    assert {path: path.stat().st_mtime_ns for path in modified} == modified


def test_a_template_the_user_chose_is_kept_with_a_warning(tmp_path, caplog):
    local = "[plots]\n    html_template = mine.html\n"
    root = dvc_project(tmp_path, local)
    with caplog.at_level(logging.WARNING):
        offline_plots.main(["--repo", str(root)])
    assert (root / ".dvc" / "config.local").read_text() == local
    assert "'mine.html' (local config)" in caplog.text
    assert f"dvc config --local plots.html_template {CONFIG_VALUE}" in caplog.text


def test_without_the_package_it_names_it_and_writes_nothing(tmp_path, monkeypatch):
    root = dvc_project(tmp_path)
    monkeypatch.setattr(offline_plots, "PACKAGE_MODULE", "js_lib_vega_embed_not_installed")
    with pytest.raises(
        OfflinePlotsError, match=rf"{PACKAGE} is not installed in this environment: .*requirements\.lock"
    ):
        offline_plots.main(["--repo", str(root)])
    assert sorted(files_under(root)) == [".dvc/config"]


def test_an_invalid_dvc_config_is_named_and_nothing_is_written(tmp_path):
    root = dvc_project(tmp_path, "[plots\n")
    with pytest.raises(OfflinePlotsError, match="DVC's config is invalid"):
        offline_plots.main(["--repo", str(root)])
    assert files_under(root) == {".dvc/config": b"", ".dvc/config.local": b"[plots\n"}


def test_outside_a_dvc_project_it_says_so_and_writes_nothing(tmp_path):
    with pytest.raises(OfflinePlotsError, match="not a DVC project"):
        offline_plots.main(["--repo", str(tmp_path)])
    assert not any(tmp_path.iterdir())


def test_dvc_plots_show_and_diff_pages_load_no_script_from_the_network(tmp_path):
    """The project's plot definitions, in a scratch git + DVC project, before and after the module."""
    root = tmp_path / "project"
    root.mkdir()
    environment = activated_environment(HOME=str(tmp_path), DVC_NO_ANALYTICS="1")

    def run(*command: str) -> str:
        result = subprocess.run(command, cwd=root, env=environment, capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            raise AssertionError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        return result.stdout + result.stderr

    definitions = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())
    paths = definitions["vars"][0]["paths"]
    plots = definitions["plots"] + [{paths["predictions"]: {"template": "confusion", "x": "predicted", "y": "actual"}}]
    (root / "dvc.yaml").write_text(yaml.safe_dump({"vars": definitions["vars"], "plots": plots}, sort_keys=False))
    shutil.copy2(PROJECT_ROOT / ".gitignore", root / ".gitignore")
    history = root / paths["history"]
    history.parent.mkdir(parents=True)
    shutil.copy2(PROJECT_ROOT / "docs" / "results" / "original-defaults_history.csv", history)
    (root / paths["predictions"]).write_text(PREDICTIONS)
    run("git", "init", "-q")
    run("dvc", "init", "-q")
    run("git", "add", "-A")
    run("git", "-c", "user.name=test", "-c", "user.email=test@example.invalid", "commit", "-qm", "plots")

    # The problem: DVC's own page loads Vega from the network.
    run("dvc", "plots", "show", "-o", str(tmp_path / "before"))
    before = scripts_of((tmp_path / "before" / "index.html").read_text(encoding="utf-8"))
    assert any(str(attributes.get("src")).startswith("https://") for attributes, _ in before)

    run("python", str(PROJECT_ROOT / "tools" / "offline_plots.py"))
    shutil.copy2(PROJECT_ROOT / "docs" / "results" / "recipe-sgd_history.csv", history)
    run("dvc", "plots", "show")
    run("dvc", "plots", "diff", "-o", str(tmp_path / "plots-diff"))  # anywhere: the page carries its scripts

    for page_path in (root / "dvc_plots" / "index.html", tmp_path / "plots-diff" / "index.html"):
        assert_needs_no_network(page_path)
        page = page_path.read_text(encoding="utf-8")
        assert page.count("vegaEmbed('#") == 3  # accuracy, loss, confusion
        assert "https://vega.github.io/schema/vega-lite/v5.json" in page  # the specs, as data
        assert "val/accuracy" in page and "val/loss" in page
    assert '"rev": "HEAD"' in (tmp_path / "plots-diff" / "index.html").read_text(encoding="utf-8")
    # The page folder and the template stay out of git.
    assert run("git", "status", "--porcelain").splitlines() == [f" M {paths['history']}"]
