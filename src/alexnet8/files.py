"""Atomic file output: write beside the target, then rename, so a crash never leaves half a file;
and telling a full disk from other write errors, with a message naming the folder and the space.

Reads nothing; writes wherever the caller says.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

CHUNK_BYTES = 1 << 20


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish(temporary: Path, path: Path, mode: int) -> None:
    # mkstemp/mkdtemp create private (0600/0700) entries; give the result the mode a plain
    # open()/mkdir() would have, so outputs stay readable by whoever may read the project.
    temporary.chmod(mode & ~_umask())
    os.replace(temporary, path)


def disk_full(error: OSError, folder: str | Path, needed: int) -> bool:
    """Whether `error`, raised while writing `needed` bytes into `folder`, means that its device is
    full. NumPy's short write (`np.save`) raises an OSError without errno: then the free space
    tells (measure it after removing what was written)."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return error.errno is None and shutil.disk_usage(folder).free < needed


def no_space_message(folder: str | Path, what: str, needed: int, exact: bool = True) -> str:
    """The error for a full device: the folder, what needs how much (more than `needed` if not
    `exact`), how much is free now."""
    return (
        f"no space left on the device of {folder}: {what} needs {'' if exact else 'more than '}"
        f"{_megabytes(needed)} ({_megabytes(shutil.disk_usage(folder).free)} free now); nothing was written. "
        "Free some space and rerun `dvc repro`"
    )


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.{1 if size < 10e6 else 0}f} MB"


def file_md5(path: str | Path) -> str:
    """The md5 of a file, read in chunks."""
    digest = hashlib.md5()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it onto `path` only if the block succeeds.

    `suffix` keeps an extension that a writer insists on (Keras only saves to `*.keras`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix or ".tmp")
    os.close(handle)
    temporary_path = Path(temporary)
    try:
        yield temporary_path
        _publish(temporary_path, path, 0o666)
    finally:
        temporary_path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder; it replaces `path` (and all it held) only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield temporary
        if path.exists():
            shutil.rmtree(path)
        _publish(temporary, path, 0o777)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def write_json(path: str | Path, data: object) -> None:
    """Write `data` as indented JSON, atomically."""
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def write_text(path: str | Path, text: str) -> None:
    """Write text, atomically."""
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
