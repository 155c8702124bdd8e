"""`train.jit_compile: auto` decides from the CPU's features, the same way on every rerun."""

import pytest

from alexnet8.runtime import cpu_features, xla_choice

AVX2_ONLY = frozenset({"sse4_2", "avx", "avx2", "fma"})
AVX512 = AVX2_ONLY | {"avx512f", "avx512bw", "avx512_bf16"}


def test_cpu_features_are_read_from_the_flags_line(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse4_2 avx2 avx512f\n\nprocessor\t: 1\n")
    assert cpu_features(cpuinfo) == {"fpu", "sse4_2", "avx2", "avx512f"}
    assert cpu_features(tmp_path / "missing") == frozenset()


@pytest.mark.parametrize(
    ("features", "has_gpu", "expected"),
    [
        (AVX2_ONLY, False, True),  # XLA trained 1.06-1.10x the original there
        (AVX512, False, False),  # and 0.79x there: oneDNN's AVX-512 kernels win
        (frozenset(), False, False),  # an unknown CPU (not Linux, or ARM): Keras' CPU default, off
        (AVX512, True, "auto"),  # a GPU: Keras decides (XLA on)
    ],
)
def test_auto_chooses_xla_by_cpu_features(features, has_gpu, expected):
    assert xla_choice("auto", features, has_gpu) == expected


@pytest.mark.parametrize("setting", [True, False])
def test_an_explicit_setting_is_kept_on_every_machine(setting):
    assert xla_choice(setting, AVX512, False) is setting
    assert xla_choice(setting, AVX2_ONLY, True) is setting


def test_auto_is_no_xla_for_a_multi_worker_training_on_cpus():
    """XLA has no collectives for CPU devices: MultiWorkerMirroredStrategy fails under it."""
    assert xla_choice("auto", AVX2_ONLY, has_gpu=False, multi_worker=True) is False
    assert xla_choice("auto", AVX2_ONLY, has_gpu=True, multi_worker=True) == "auto"
