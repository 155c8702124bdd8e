"""Offline `dvc plots show` / `dvc plots diff`: a page template with Vega, Vega-Lite and vega-embed inlined.

Reads: the three JavaScript builds shipped by the PyPI package django-js-lib-vega-embed (pinned
with its hashes in requirements.lock), each checked against the sha256 pinned below, and the DVC
project's config (the project is found from `--repo`, default the current folder, as dvc does).
Writes: `.dvc/plots/offline_template.html` (gitignored) and `plots.html_template` in
`.dvc/config.local` (kept out of git by DVC), so the pages DVC writes need no network.

DVC's default page (dvc-render's `PAGE_HTML`) loads vega@5.20.2, vega-lite@5.2.0 and
vega-embed@6.18.2 from a CDN through its `{scripts}` placeholder: offline, every Vega-Lite chart
(accuracy, loss, confusion) is silently missing. The template written here has no `{scripts}`
placeholder, so DVC adds none of those tags; it inlines the same major versions instead (the
image and table renderers DVC also uses need no script). Inlined rather than linked, because
`dvc plots show -o DIR` writes only `DIR/index.html`: a linked copy would not follow it.
DVC resolves a relative `plots.html_template` from `.dvc/`.

Run at setup (`make setup`) as `python tools/offline_plots.py`. Idempotent: with everything in place it
writes nothing. A `plots.html_template` that names another template, in any DVC config, is the
user's choice: it is kept, with a warning.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from alexnet8 import cli
from alexnet8.errors import PipelineError
from alexnet8.files import write_text

logger = logging.getLogger("offline_plots")  # the same name run as a script or loaded by the tests

PACKAGE = "django-js-lib-vega-embed"
PACKAGE_VERSION = "6.29.0.3"
PACKAGE_MODULE = "js_lib_vega_embed"
PACKAGE_FOLDER = "static/js_lib_vega_embed"

# Relative to .dvc/, as DVC resolves `plots.html_template`. `.dvc/plots/` is also DVC's folder
# for custom Vega-Lite templates, which are looked up by the name a plot gives (`template:`);
# no plot names this file.
CONFIG_VALUE = "plots/offline_template.html"
CONFIG_SECTION = "plots"
CONFIG_KEY = "html_template"


@dataclass(frozen=True)
class Build:
    """One of the three scripts: its npm package and version, its file in PACKAGE, its sha256."""

    name: str
    version: str
    resource: str
    sha256: str


# In load order: vega-lite needs the `vega` global, vega-embed both `vega` and `vegaLite`.
# Each file is the npm package's build/*.min.js without its last line (the source-map comment):
# checked byte for byte against the npm tarballs of these versions.
BUILDS = (
    Build("vega", "5.33.0", "vega5.js", "6a6c1e9978bd78435dfbb51344d1d536319262e70f2c569ca9764ce5acc203da"),
    Build("vega-lite", "5.23.0", "vega-lite5.js", "594f554cecafe6b992d51b7c00f4c0e5fc5f92114c7e1a641d2cf150f21cc60d"),
    Build("vega-embed", "6.29.0", "vega-embed6.js", "dbd49aff8999dfb12983cbcefeefb355ae72af68d7556ddcec12193a0eb46450"),
)

# dvc-render fills these with str.replace; a script holding one would be rewritten.
DVC_PLACEHOLDERS = ("{scripts}", "{plot_divs}", "{refresh_tag}")
# Inside <script>, the HTML parser ends the element at `</script` and treats `<!--` specially.
UNSAFE_IN_SCRIPT = re.compile(r"</script|<!--", re.IGNORECASE)

PAGE = """<!DOCTYPE html>
<html>
<head>
    <meta charset="utf-8">
    {{refresh_tag}}
    <title>DVC Plot</title>
    <!-- Written by `python tools/offline_plots.py`: {versions}, inlined so that the page needs no network. -->
{scripts}
    <style>
        table {{
            border-spacing: 15px;
        }}
    </style>
</head>
<body>
    {{plot_divs}}
</body>
</html>
"""


class OfflinePlotsError(PipelineError):
    """The offline plots template can not be built or configured."""


def offline_template(sources: Mapping[str, bytes], builds: Sequence[Build] = BUILDS) -> str:
    """The page template for DVC: each build checked against its sha256, then inlined in order.

    `sources` maps each build's `resource` to the file's bytes.
    """
    scripts = []
    for build in builds:
        try:
            content = sources[build.resource]
        except KeyError:
            raise OfflinePlotsError(
                f"{build.resource} ({build.name} {build.version}) is missing from {PACKAGE}"
            ) from None
        digest = hashlib.sha256(content).hexdigest()
        if digest != build.sha256:
            raise OfflinePlotsError(
                f"{build.resource} from {PACKAGE} has sha256 {digest}, expected {build.sha256} "
                f"({build.name} {build.version}): "
                f"install {PACKAGE}=={PACKAGE_VERSION} from requirements.lock (`make setup`)"
            )
        try:
            text = content.decode("utf-8")
        except UnicodeDecodeError as error:
            raise OfflinePlotsError(f"{build.resource} from {PACKAGE} is not UTF-8 text: {error}") from None
        if UNSAFE_IN_SCRIPT.search(text):
            raise OfflinePlotsError(
                f"{build.resource} contains '</script' or '<!--': it can not be inlined in a <script> element"
            )
        for placeholder in DVC_PLACEHOLDERS:
            if placeholder in text:
                raise OfflinePlotsError(
                    f"{build.resource} contains DVC's placeholder {placeholder}: DVC would replace it"
                )
        scripts.append(
            f'    <script type="text/javascript">\n/* {build.name} {build.version} */\n{text.rstrip()}\n    </script>'
        )
    versions = ", ".join(f"{build.name} {build.version}" for build in builds)
    return PAGE.format(versions=versions, scripts="\n".join(scripts))


def with_html_template(config_text: str, value: str) -> str:
    """`config_text` (a DVC config file) with `plots.html_template` set to `value`; everything else kept.

    Comments, remotes and every other setting stay as they were (configobj, which DVC reads its
    config with, round-trips them). Section and key names match case-insensitively, as in DVC.
    """
    from configobj import ConfigObj, ConfigObjError

    try:
        config = ConfigObj(config_text.splitlines())
    except ConfigObjError as error:
        raise OfflinePlotsError(f"can not parse the DVC config: {error}") from None
    section_name = next((name for name in config if name.lower() == CONFIG_SECTION), CONFIG_SECTION)
    if section_name not in config:
        config[section_name] = {}
    section = config[section_name]
    if not isinstance(section, dict):
        raise OfflinePlotsError(f"'{section_name}' is a value, not a section, in the DVC config")
    for key in [key for key in section if key.lower() == CONFIG_KEY]:
        del section[key]
    section[CONFIG_KEY] = value
    return "\n".join(config.write()) + "\n"


def read_sources(builds: Sequence[Build] = BUILDS) -> dict[str, bytes]:
    """Each build's file, as installed with PACKAGE."""
    from importlib import resources

    try:
        folder = resources.files(PACKAGE_MODULE).joinpath(*PACKAGE_FOLDER.split("/"))
    except ModuleNotFoundError:
        raise OfflinePlotsError(
            f"{PACKAGE} is not installed in this environment: install it from requirements.lock (`make setup`)"
        ) from None
    sources = {}
    for build in builds:
        try:
            sources[build.resource] = folder.joinpath(build.resource).read_bytes()
        except FileNotFoundError:
            raise OfflinePlotsError(
                f"{build.resource} is missing from the installed {PACKAGE}: install {PACKAGE}=={PACKAGE_VERSION} "
                "from requirements.lock (`make setup`)"
            ) from None
    return sources


def find_project(start: str | Path) -> Path:
    """The DVC project holding `start` (as dvc finds it: `start`, or the nearest parent with `.dvc/`)."""
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    try:
        return Path(Repo.find_root(os.fspath(start)))
    except NotDvcRepoError as error:
        raise OfflinePlotsError(f"{start}: not a DVC project ({error}); run this from the project's folder") from None


def configured_templates(dvc_dir: Path) -> dict[str, str]:
    """`plots.html_template` in each DVC config level that sets it (system, global, repo, local)."""
    from dvc.config import Config, ConfigError

    try:
        config = Config(dvc_dir=os.fspath(dvc_dir))  # loads and validates every level
        return {
            level: value
            for level in config.files
            if (value := config.load_one(level).get(CONFIG_SECTION, {}).get(CONFIG_KEY))
        }
    except ConfigError as error:
        raise OfflinePlotsError(f"DVC's config is invalid, fix it first: {error}") from None


def _resolves_to(value: str, dvc_dir: Path, template: Path) -> bool:
    # As `dvc plots` does: a relative path is taken from .dvc/.
    path = Path(value) if os.path.isabs(value) else dvc_dir / value
    return os.path.normpath(path) == os.path.normpath(template)


def _replace_keeping_mode(path: Path, text: str) -> None:
    # Like files.write_text, but config.local may hold a remote's credentials: keep its mode.
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~_umask()
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    finally:
        Path(temporary).unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def main(argv: Sequence[str] | None = None) -> None:
    argument_parser = cli.parser(__doc__.splitlines()[0], reads_params=False)
    argument_parser.add_argument("--repo", default=".", help="the DVC project, or a folder inside it (default: .)")
    arguments = argument_parser.parse_args(argv)

    root = find_project(arguments.repo)
    dvc_dir = root / ".dvc"
    template_path = dvc_dir / CONFIG_VALUE
    local_config = dvc_dir / "config.local"

    # Everything that can fail is checked before anything is written.
    template = offline_template(read_sources())
    configured = configured_templates(dvc_dir)
    others = {level: value for level, value in configured.items() if not _resolves_to(value, dvc_dir, template_path)}
    try:
        old_config = local_config.read_text(encoding="utf-8") if local_config.exists() else ""
    except (OSError, UnicodeDecodeError) as error:
        raise OfflinePlotsError(f"can not read {local_config}: {error}") from None
    try:
        new_config = with_html_template(old_config, CONFIG_VALUE)
    except OfflinePlotsError as error:
        raise OfflinePlotsError(f"{local_config}: {error}") from None

    try:
        if template_path.exists() and template_path.read_bytes() == template.encode("utf-8"):
            logger.info("%s is up to date", template_path)
        else:
            write_text(template_path, template)
            logger.info("wrote %s (%d KiB)", template_path, len(template.encode()) // 1024)
    except OSError as error:
        raise OfflinePlotsError(f"can not write {template_path}: {error}") from None

    if others:
        settings = ", ".join(f"'{value}' ({level} config)" for level, value in others.items())
        logger.warning(
            "plots.html_template is already set to %s: kept, so `dvc plots show` uses that template; "
            "for pages that need no network run `dvc config --local %s.%s %s`",
            settings,
            CONFIG_SECTION,
            CONFIG_KEY,
            CONFIG_VALUE,
        )
        return
    if configured:  # every level that sets it names ours
        logger.info("plots.html_template is already %s (%s config)", CONFIG_VALUE, ", ".join(configured))
        return
    try:
        _replace_keeping_mode(local_config, new_config)
    except OSError as error:
        raise OfflinePlotsError(f"can not write {local_config}: {error}") from None
    logger.info(
        "set plots.html_template = %s in %s: `dvc plots show` and `dvc plots diff` pages now need no network",
        CONFIG_VALUE,
        local_config,
    )


if __name__ == "__main__":
    cli.run(main)
