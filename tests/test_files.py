"""Atomic outputs: all or nothing, with the permissions of a plain write."""

from __future__ import annotations

import os

import pytest

from alexnet8.files import atomic_directory, atomic_path, write_json


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def test_written_files_and_folders_get_the_umask_mode_not_the_private_temporary_one(tmp_path, umask_022):
    write_json(tmp_path / "metrics.json", {"accuracy": 1})
    with atomic_directory(tmp_path / "prepared") as folder:
        (folder / "a.npy").write_bytes(b"x")
    assert (tmp_path / "metrics.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "prepared").stat().st_mode & 0o777 == 0o755


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "model.keras"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target, suffix=".keras") as temporary:
        temporary.write_text("half")
        raise RuntimeError("crash while writing")
    with pytest.raises(RuntimeError), atomic_directory(tmp_path / "prepared") as folder:
        (folder / "a.npy").write_bytes(b"half")
        raise RuntimeError("crash while writing")
    assert target.read_text() == "old"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model.keras"]
