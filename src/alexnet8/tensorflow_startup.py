"""TensorFlow's native start-up lines, without the ones that are not news on a machine without a GPU.

Reads: whether an NVIDIA driver is loaded (`/proc/driver/nvidia/version`). Writes: the process's
standard error (file descriptor 2), which it filters while TensorFlow loads.

Importing TensorFlow 2.21 and listing its devices prints, from C++ and before absl's logging is
set up (so TF_CPP_MIN_LOG_LEVEL does not apply), "All log messages before absl::InitializeLog()
...", "Could not find cuda drivers" (twice: two of its libraries each say it) and, at error
level, "failed call to cuInit ... (303)". On a machine without an NVIDIA driver none of them is
a problem: they are dropped, and a line says where TensorFlow runs. With a driver, a failing
cuInit is a real error and is shown. Every other line passes through unchanged and in order.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

NVIDIA_DRIVER = Path("/proc/driver/nvidia/version")
ALWAYS_NOISE = re.compile(rb"All log messages before absl::InitializeLog\(\) is called|Could not find cuda drivers")
NOISE_WITHOUT_DRIVER = re.compile(rb"failed call to cuInit: .*\(303\)")


def is_noise(line: bytes, driver_loaded: bool) -> bool:
    """Whether a native start-up line says nothing a user must know."""
    return bool(ALWAYS_NOISE.search(line) or (not driver_loaded and NOISE_WITHOUT_DRIVER.search(line)))


@contextlib.contextmanager
def filtered_stderr(driver_loaded: bool) -> Iterator[None]:
    """Inside the block, file descriptor 2 goes through a pipe that drops `is_noise` lines."""
    sys.stderr.flush()
    original = os.dup(2)
    reader, writer = os.pipe()
    os.dup2(writer, 2)
    os.close(writer)

    def forward() -> None:
        with os.fdopen(reader, "rb") as lines:
            for line in lines:
                if not is_noise(line, driver_loaded):
                    os.write(original, line)

    forwarder = threading.Thread(target=forward, name="tensorflow-startup-stderr", daemon=True)
    forwarder.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(original, 2)  # closes the pipe's last writer: the forwarder reads to its end
        forwarder.join()
        os.close(original)


def load_tensorflow() -> None:
    """Import TensorFlow and let it find its devices, without its start-up noise (see above)."""
    driver_loaded = NVIDIA_DRIVER.exists()
    with filtered_stderr(driver_loaded):
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
    logger.info("TensorFlow %s on %s", tf.__version__, f"{len(gpus)} GPU(s)" if gpus else "the CPU (no GPU found)")
