"""The project's own MLflow store: `mlflow.db` and the artifacts in `mlruns/`, both in the project root.

Reads and writes: `<project root>/mlflow.db`: checks it with SQLite's own quick check before a
stage logs into it, and rewrites the artifact paths it holds after the project was copied or
moved (`keep_inside`).

MLflow records artifact locations as absolute paths. A project copied with `cp -a` would go on
writing its artifacts and models into the original's `mlruns/`, and a moved one would recreate
the old folder: so before a stage logs, every path under an old project root is rewritten to
the same path under this one (where the copy or move put the artifacts), and the old runs stay
browsable. Paths elsewhere (an artifact location set by hand) are left alone.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from pathlib import Path
from urllib.parse import unquote, urlparse

from alexnet8 import library_patches
from alexnet8.errors import PipelineError

logger = logging.getLogger(__name__)

STORE_FILE = "mlflow.db"
ARTIFACTS_FOLDER = "mlruns"
# Where MLflow 3 keeps artifact paths (experiments, runs, logged models, registered versions).
PATH_COLUMNS = (
    ("experiments", "artifact_location"),
    ("runs", "artifact_uri"),
    ("logged_models", "artifact_location"),
    ("model_versions", "storage_location"),
)


def project_root(folder: str | Path | None = None) -> Path:
    """The project a stage runs for: `folder` (default: the working folder), or, inside a DVC
    temporary experiment workspace (<project>/.dvc/tmp/exps/...), the project it belongs to."""
    folder = Path(folder or Path.cwd()).resolve()
    parts = folder.parts
    for index in range(len(parts) - 2):
        if parts[index : index + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:index])
    return folder


def store_uri(root: Path | None = None) -> str:
    return f"sqlite:///{(root or project_root()) / STORE_FILE}"


def _recorded_path(location: str) -> Path:
    return Path(unquote(urlparse(location).path)) if location.startswith("file:") else Path(location)


def _recorded_root(connection: sqlite3.Connection) -> Path | None:
    """The project root the store was made in: MLflow puts its Default experiment (id 0) in
    `<working folder>/mlruns/0` when it creates the store, and keep_inside keeps that up to date."""
    row = connection.execute("SELECT artifact_location FROM experiments WHERE experiment_id = 0").fetchone()
    path = _recorded_path(row[0] or "") if row else None
    if path is None or path.parts[-2:] != (ARTIFACTS_FOLDER, "0"):
        return None
    return path.parent.parent


def _prefixes(root: Path) -> list[str]:
    artifacts = root / ARTIFACTS_FOLDER
    return [artifacts.as_uri(), str(artifacts)]  # MLflow keeps both forms


def _damaged(database: Path, problem: str) -> PipelineError:
    return PipelineError(
        f"{database} is damaged ({problem}): MLflow cannot record runs in it. Move it aside "
        f"(`mv {database} {database}.damaged`): the next stage starts a new store; the artifacts in "
        f"{database.parent / ARTIFACTS_FOLDER} stay, the old runs' records are lost"
    )


def keep_inside(root: Path) -> int:
    """Check the store, then rewrite its artifact paths under an old project root to this `root`;
    returns how many. A damaged store raises PipelineError naming it, before any work is done."""
    database = root / STORE_FILE
    if not database.is_file():
        return 0
    # closing(): sqlite3's own context manager commits (or rolls back) but leaves the file open.
    with contextlib.closing(sqlite3.connect(database, timeout=60)) as connection, connection:
        try:
            # SQLite's own check of the file's structure: milliseconds on a project's store.
            problems = [row[0] for row in connection.execute("PRAGMA quick_check")]
            tables = {name for (name,) in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        except sqlite3.DatabaseError as error:
            raise _damaged(database, str(error)) from None
        if problems != ["ok"]:
            raise _damaged(database, "; ".join(problems[:3]))
        if "experiments" not in tables:
            return 0
        library_patches.LOCAL_STORE_PATHS.check()  # the SQL below assumes MLflow's tables
        rewritten = 0
        old_root = _recorded_root(connection)
        if old_root is not None and old_root != root:
            for old, new in zip(_prefixes(old_root), _prefixes(root), strict=True):
                for table, column in PATH_COLUMNS:
                    if table not in tables:
                        continue
                    # The prefix itself, or the prefix and a path below it: never /old-project-2/...
                    rewritten += connection.execute(
                        f"UPDATE {table} SET {column} = ? || substr({column}, length(?) + 1) "  # noqa: S608
                        f"WHERE substr({column}, 1, length(?)) = ? "
                        f"AND (length({column}) = length(?) OR substr({column}, length(?) + 1, 1) = '/')",
                        (new, old, old, old, old, old),
                    ).rowcount
            # A store first made by a queued experiment recorded DVC's temporary copy: no news to a user.
            log = logger.debug if project_root(old_root) == root else logger.warning
            log(
                "this project was copied or moved from %s: its MLflow store now keeps artifacts in %s",
                old_root,
                root / ARTIFACTS_FOLDER,
            )
    return rewritten
