"""Every place the project relies on a library's private API or on behaviour its documentation does
not promise, with the versions each was checked on.

Reads: the installed versions of the patched libraries (package metadata). Writes nothing.

Each fence names the library, the versions its patch ran on (from the version requirements.lock
installs up to, not including, the next minor release: pyproject.toml admits the same range, and
tests/test_library_patches.py keeps the two equal), where the patch is and why it is there. The
code that applies a patch calls its fence's `check()` first, so on any other version the stage
stops with LibraryVersionError naming the library, its version and the checked range, instead of
failing somewhere inside the library or, worse, computing something else.

After upgrading one of these libraries: move its range below and in pyproject.toml, then run each
fence's `tests` (`python -m pytest $(python -m alexnet8.library_patches keras)` for Keras'). A
patch that fails there is rewritten; one the library made unnecessary goes.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass

from packaging.specifiers import SpecifierSet
from packaging.version import Version

from alexnet8.errors import PipelineError

# The versions the patches ran on, per library (requirements.lock's versions and their patch releases).
CHECKED = {
    "keras": ">=3.15.1,<3.16",
    "tensorflow": ">=2.21.0,<2.22",
    "mlflow": ">=3.17.2,<3.18",
    # requirements.lock installs 2.4.6 on Python 3.11 and 2.5.5 on 3.12 and 3.13
    "numpy": ">=2.4.6,<2.6",
}


class LibraryVersionError(PipelineError):
    """A patched library's installed version is outside the range its patch was checked on."""


def installed_version(library: str) -> str:
    return importlib.metadata.version(library)


@dataclass(frozen=True)
class Fence:
    """A patch on `library`: where it is (`site`), what it relies on, why it is there, and the tests
    that show it still works."""

    library: str
    site: str
    relies_on: str
    reason: str
    tests: tuple[str, ...]

    @property
    def checked(self) -> str:
        return CHECKED[self.library]

    def check(self) -> None:
        """Raise LibraryVersionError unless the installed `library` is in the checked range."""
        version = installed_version(self.library)
        if not SpecifierSet(self.checked).contains(Version(version), prereleases=True):
            raise LibraryVersionError(
                f"{self.library} {version} is installed, but {self.site} patches {self.library} "
                f"({self.relies_on}) and was checked on {self.library}{self.checked} only: install "
                f"the locked versions (`make setup`), or see library_patches.py on checking a new version"
            )


KERAS_FIT_UNDER_MULTI_WORKER = Fence(
    "keras",
    "multi_worker.prepare_for_fit",
    "Model._symbolic_build, a no-op Model._maybe_symbolic_build, train_step and test_step wrapped",
    "Keras' fit fails under MultiWorkerMirroredStrategy (keras-team/keras#20585, tensorflow/tensorflow#72388)",
    ("tests/test_multi_worker.py",),
)
TENSORFLOW_COORDINATION_SERVICE = Fence(
    "tensorflow",
    "multi_worker.create_strategy",
    "tensorflow.python.eager.context's configure_coordination_service and its CoordinatedJob proto",
    "bounded heartbeat and registration timeouts: a dead worker is detected instead of waited for",
    ("tests/test_multi_worker.py",),
)
FUSED_OPTIMIZERS = Fence(
    "keras",
    "optimization.FusedAdam, FusedAdamW and FusedSGD",
    "Optimizer._get_variable_index, Adam's _momentums and _velocities, SGD's momentums",
    "one fused TensorFlow kernel per weight update instead of a dozen ops (docs/performance.md)",
    ("tests/test_optimization.py",),
)
LOCAL_STORE_PATHS = Fence(
    "mlflow",
    "local_store.keep_inside",
    "SQL on the tables of MLflow's SQLite store (local_store.PATH_COLUMNS)",
    "a project copied or moved keeps its artifacts inside it",
    ("tests/test_local_store.py", "tests/test_tracking.py"),
)
MLFLOW_HTTP_RETRIES = Fence(
    "mlflow",
    "tracking.bound_http_requests",
    "os.environ's MLFLOW_HTTP_REQUEST_* read by the client at each request, not once at import",
    "a tracking server that does not answer costs seconds, not minutes",
    ("tests/test_tracking.py", "tests/test_faults.py"),
)
# The served model cannot import this package: image_classifier.py repeats this check (and the
# range, which tests/test_library_patches.py keeps equal to CHECKED["numpy"]).
NUMPY_PRINT_OPTIONS = Fence(
    "numpy",
    "image_classifier.ImageClassifier.load_context",
    "np.set_printoptions, process-wide, with formatters for strings and objects",
    "MLflow's scoring server puts the input's repr into its error messages: kept to a line",
    ("tests/test_serving.py",),
)

FENCES = (
    KERAS_FIT_UNDER_MULTI_WORKER,
    TENSORFLOW_COORDINATION_SERVICE,
    FUSED_OPTIMIZERS,
    LOCAL_STORE_PATHS,
    MLFLOW_HTTP_RETRIES,
    NUMPY_PRINT_OPTIONS,
)


def main(argv: list[str] | None = None) -> None:
    """Print the test files of the fences on the libraries named (all fences without names)."""
    import sys

    libraries = set(sys.argv[1:] if argv is None else argv) or set(CHECKED)
    unknown = libraries - set(CHECKED)
    if unknown:
        raise SystemExit(f"no patches on {', '.join(sorted(unknown))}: the patched libraries are {', '.join(CHECKED)}")
    print(" ".join(dict.fromkeys(test for fence in FENCES if fence.library in libraries for test in fence.tests)))


if __name__ == "__main__":
    main()
