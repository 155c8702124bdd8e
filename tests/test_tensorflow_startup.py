"""tensorflow_startup.py: a stage's output on a machine without a GPU holds no error-level line
that is not an error and no line twice; other lines written to standard error pass unchanged."""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import write_params

from alexnet8.tensorflow_startup import NVIDIA_DRIVER, is_noise

CUINIT = b"E0000 00:00:1796434067.077284   19871 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)\n"  # noqa: E501


def test_the_cuinit_error_is_noise_only_without_an_nvidia_driver():
    assert is_noise(CUINIT, driver_loaded=False) and not is_noise(CUINIT, driver_loaded=True)
    assert is_noise(
        b"I0000 ... cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will not be used.\n", True
    )
    assert not is_noise(b"W0000 ... some other warning\n", False)


def test_lines_written_while_tensorflow_loads_pass_through_in_order():
    script = (
        "import os\n"
        "from alexnet8.tensorflow_startup import filtered_stderr\n"
        "with filtered_stderr(driver_loaded=False):\n"
        "    os.write(2, b'first\\n')\n"
        f"    os.write(2, {CUINIT!r})\n"
        "    os.write(2, b'second\\n')\n"
        "os.write(2, b'after\\n')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, check=True)
    assert result.stderr == b"first\nsecond\nafter\n"


@pytest.mark.skipif(NVIDIA_DRIVER.exists(), reason="this machine has an NVIDIA driver: cuInit errors are real here")
def test_a_stage_on_a_cpu_only_machine_prints_no_false_error_and_no_line_twice(tmp_path):
    params = write_params(tmp_path / "params.yaml")
    command = [sys.executable, "-m", "alexnet8", "evaluate", "--params", str(params)]
    for option in ("--model", "--data", "--run-file", "--metrics", "--predictions", "--served-model"):
        command += [option, str(tmp_path / "missing")]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert result.returncode == 1 and "TensorFlow" in lines[0] and "on the CPU (no GPU found)" in lines[0], lines
    assert not [line for line in lines if line.startswith("E0000") or "cuInit" in line or "cuda drivers" in line]
    assert len(lines) == len(set(lines)), lines
    assert "not found: run the train stage first" in lines[-1]  # the one real error: no run file
