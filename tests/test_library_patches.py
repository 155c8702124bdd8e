"""The fences around the patches on libraries' private APIs (alexnet8.library_patches): each passes on
the locked versions, fails loudly on any other, is checked where its patch is applied, and admits
what pyproject.toml admits."""

from __future__ import annotations

import re
import sqlite3
import subprocess
import sys
import tomllib
import warnings

import pytest
from helpers import PROJECT_ROOT
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from alexnet8 import image_classifier, library_patches
from alexnet8.library_patches import CHECKED, FENCES, LibraryVersionError

# A version below each checked range, and one past it.
OTHER_VERSIONS = {"keras": ("3.14.0", "3.16.0"), "tensorflow": ("2.20.0", "2.22.0"), "mlflow": ("3.17.1", "3.18.0")}
OTHER_VERSIONS["numpy"] = ("2.4.5", "2.6.0")


def fake_version(monkeypatch, library: str, version: str) -> None:
    real = library_patches.installed_version
    monkeypatch.setattr(library_patches, "installed_version", lambda name: version if name == library else real(name))


@pytest.mark.parametrize("fence", FENCES, ids=lambda fence: fence.site)
def test_each_fence_passes_on_the_installed_versions_and_trips_on_any_other(fence, monkeypatch):
    fence.check()
    for version in OTHER_VERSIONS[fence.library]:
        fake_version(monkeypatch, fence.library, version)
        with pytest.raises(LibraryVersionError) as raised:
            fence.check()
        message = str(raised.value)
        assert f"{fence.library} {version} is installed" in message
        assert f"{fence.site} patches {fence.library}" in message
        assert f"checked on {fence.library}{CHECKED[fence.library]} only" in message


def test_pyproject_admits_exactly_the_checked_versions_of_each_patched_library():
    dependencies = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    ranges = {requirement.name: requirement.specifier for requirement in map(Requirement, dependencies)}
    assert {library: ranges[library] for library in CHECKED} == {
        library: SpecifierSet(checked) for library, checked in CHECKED.items()
    }


def test_every_locked_version_of_a_patched_library_is_checked():
    lock = (PROJECT_ROOT / "requirements.lock").read_text()
    for library, checked in CHECKED.items():
        locked = re.findall(rf"^{library}==([^\s;\\]+)", lock, re.MULTILINE)
        assert locked and all(version in SpecifierSet(checked) for version in locked), (library, locked)


def test_the_served_models_own_numpy_check_has_the_fences_range():
    assert SpecifierSet(image_classifier.NUMPY_CHECKED) == SpecifierSet(CHECKED["numpy"])
    image_classifier.check_numpy_version()
    with pytest.raises(RuntimeError, match=r"numpy 2\.6\.0 is installed, .*checked on numpy>=2\.4\.6,<2\.6 only"):
        image_classifier.check_numpy_version("2.6.0")


def test_the_patch_sites_check_their_fences(monkeypatch, tmp_path):
    """Each patch refuses to apply on an unchecked version, before it touches anything."""
    from alexnet8 import local_store, multi_worker, optimization, tracking

    fake_version(monkeypatch, "keras", "3.16.0")
    for apply in (
        lambda: multi_worker.prepare_for_fit(None, None, None),
        lambda: optimization.FusedAdam().build([]),
        lambda: optimization.FusedSGD(momentum=0.9).build([]),
    ):
        with pytest.raises(LibraryVersionError, match="keras 3.16.0 is installed"):
            apply()
    fake_version(monkeypatch, "tensorflow", "2.22.0")
    with pytest.raises(LibraryVersionError, match="multi_worker.create_strategy patches tensorflow"):
        multi_worker.create_strategy(None)

    fake_version(monkeypatch, "mlflow", "3.18.0")
    with pytest.raises(LibraryVersionError, match="tracking.bound_http_requests patches mlflow"):
        tracking.bound_http_requests()
    store = tmp_path / local_store.STORE_FILE
    with sqlite3.connect(store) as connection:
        connection.execute("CREATE TABLE experiments (experiment_id INTEGER, artifact_location TEXT)")
        connection.execute("INSERT INTO experiments VALUES (0, '/elsewhere/mlruns/0')")
    before = store.read_bytes()
    with pytest.raises(LibraryVersionError, match="local_store.keep_inside patches mlflow"):
        local_store.keep_inside(tmp_path)
    assert store.read_bytes() == before


def test_the_fences_tests_are_listed_by_library():
    listed = subprocess.run(
        [sys.executable, "-m", "alexnet8.library_patches", "mlflow"], capture_output=True, text=True, check=True
    ).stdout.split()
    assert listed == ["tests/test_local_store.py", "tests/test_tracking.py", "tests/test_faults.py"]
    assert all((PROJECT_ROOT / test).is_file() for fence in FENCES for test in fence.tests)


@pytest.mark.parametrize(
    ("module", "shown"),
    [
        ("alexnet8.network", True),
        ("keras.src.models.model", True),
        ("tensorflow.python.framework.ops", True),
        ("mlflow.tracking.fluent", True),
        ("numpy._core.numeric", True),
        ("urllib3.connectionpool", False),
    ],
)
def test_deprecations_from_the_project_and_the_patched_libraries_are_shown(module, shown):
    """pyproject.toml's filterwarnings, which pytest applies around every test."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.warn_explicit("old", DeprecationWarning, f"{module.replace('.', '/')}.py", 1, module=module)
    assert bool(caught) == shown
