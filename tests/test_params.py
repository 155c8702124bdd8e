"""params.yaml is validated at load: every bad key fails before any work, naming the key."""

import copy

import pytest
import yaml
from helpers import PROJECT_ROOT

from alexnet8.errors import ParamsError
from alexnet8.params import load_params, parse_params, with_overrides

DEFAULTS = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())


def test_the_shipped_params_are_the_original_scripts_defaults(default_params):
    train = default_params.train
    assert (train.optimizer, train.learning_rate, train.batch_size, train.epochs) == ("adam", 0.001, 32, 5)
    assert (train.dropout, train.dense_units) == (0.5, 2048)
    assert (train.lr_batch_scaling, train.cutout_size, train.label_smoothing, train.random_flip) == (
        "none",
        0,
        0,
        False,
    )
    assert default_params.preprocess.normalization == "unit"
    assert default_params.fetch.md5 == "c32a1d4ab5d03f1284b67883e8d87530"


def test_flat_names_keys_as_dvc_does(default_params):
    flat = default_params.flat()
    assert flat["train.epochs"] == 5
    assert flat["seed"] == 42
    assert flat["mlflow.experiment_name"] == "alexnet8-cifar10"


def test_exponent_notation_is_a_number():
    raw = copy.deepcopy(DEFAULTS)
    raw["train"]["learning_rate"] = "1e-3"  # PyYAML reads 1e-3 as a string
    assert parse_params(raw).train.learning_rate == 0.001


def _with(dotted, value):
    if value is not _DELETE:
        return with_overrides(DEFAULTS, {dotted: value})
    raw = copy.deepcopy(DEFAULTS)
    *sections, key = dotted.split(".")
    del (raw[sections[0]] if sections else raw)[key]
    return raw


class _Deleted:
    """The key removed (its repr names it, so the test ids are the same in every process)."""

    def __repr__(self) -> str:
        return "<deleted>"


_DELETE = _Deleted()

BAD_PARAMS = [
    # (key, value, what the message must say)
    ("train.epochs", 0, "train.epochs: Input should be greater than 0"),
    ("train.epochs", -3, "train.epochs: Input should be greater than 0"),
    ("train.epochs", 2.5, "train.epochs: Input should be a valid integer"),
    ("train.epochs", "five", "train.epochs: Input should be a valid integer"),
    ("train.epochs", _DELETE, "train.epochs: missing"),
    ("train.epoch", 5, "train.epoch: unknown key"),
    ("train.batch_size", 0, "train.batch_size: Input should be greater than 0"),
    ("train.learning_rate", 0, "train.learning_rate: Input should be greater than 0"),
    ("train.learning_rate", -0.1, "train.learning_rate: Input should be greater than 0"),
    ("train.learning_rate", "fast", "train.learning_rate: Value error, expected a number, got 'fast'"),
    ("train.learning_rate", True, "train.learning_rate: Value error, expected a number, got a boolean"),
    ("train.dropout", 1.0, "train.dropout: Input should be less than 1"),
    ("train.dropout", -0.1, "train.dropout: Input should be greater than or equal to 0"),
    ("train.optimizer", "adagrad", "train.optimizer: Input should be 'adam', 'adamw' or 'sgd'"),
    ("train.lr_schedule", "step", "train.lr_schedule: Input should be 'constant' or 'warmup_cosine'"),
    ("train.warmup_fraction", 1.0, "train.warmup_fraction: Input should be less than 1"),
    ("train.weight_decay", -0.01, "train.weight_decay: Input should be greater than or equal to 0"),
    ("train.random_flip", "yes", "train.random_flip: Value error, expected true, false or alternating, got 'yes'"),
    ("train.random_crop_padding", -4, "train.random_crop_padding: Input should be greater than or equal to 0"),
    ("train.cutout_size", 33, "train.cutout_size: Input should be less than or equal to 32"),
    ("train.label_smoothing", 1, "train.label_smoothing: Input should be less than 1"),
    ("train.lr_batch_scaling", "cubic", "train.lr_batch_scaling: Input should be 'none', 'linear' or 'sqrt'"),
    ("train.precision", "float16", "train.precision: Input should be 'float32', 'mixed_float16' or 'mixed_bfloat16'"),
    ("train.lr_reference_batch_size", 0, "train.lr_reference_batch_size: Input should be greater than 0"),
    ("train.jit_compile", 1, "train.jit_compile: Value error, expected true, false or auto, got 1"),
    ("preprocess.validation_fraction", 0, "preprocess.validation_fraction: Input should be greater than 0"),
    ("preprocess.validation_fraction", 1.5, "preprocess.validation_fraction: Input should be less than 1"),
    ("preprocess.normalization", "minmax", "preprocess.normalization: Input should be 'unit' or 'standardize'"),
    ("fetch.md5", "abc", "fetch.md5: String should match pattern"),
    ("fetch.md5", "z" * 32, "fetch.md5: String should match pattern"),
    ("fetch.url", "ftp://example.org/cifar.tar.gz", "fetch.url: Value error, unsupported URL scheme 'ftp'"),
    ("fetch.url", "", "fetch.url: String should have at least 1 character"),
    ("seed", -1, "seed: Input should be greater than or equal to 0"),
    ("seed", 2**64, "seed: Input should be less than 4294967296"),
    ("mlflow", _DELETE, "mlflow: missing"),
    ("extra_section", {}, "extra_section: unknown key"),
]


@pytest.mark.parametrize(("key", "value", "message"), BAD_PARAMS, ids=[f"{k}={v!r}"[:40] for k, v, _ in BAD_PARAMS])
def test_bad_params_fail_naming_the_key(key, value, message):
    with pytest.raises(ParamsError) as error:
        parse_params(_with(key, value), source="params.yaml")
    assert message in str(error.value)
    assert str(error.value).startswith("params.yaml: invalid params:")


def test_every_bad_key_is_reported_at_once():
    raw = _with("train.epochs", 0)
    raw["train"]["batch_size"] = -1
    with pytest.raises(ParamsError) as error:
        parse_params(raw)
    assert "train.epochs" in str(error.value) and "train.batch_size" in str(error.value)


def test_missing_or_unparsable_file_is_named(tmp_path):
    with pytest.raises(ParamsError, match="nowhere.yaml: cannot read params file"):
        load_params(tmp_path / "nowhere.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [unclosed\n")
    with pytest.raises(ParamsError, match="broken.yaml: not valid YAML"):
        load_params(broken)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ParamsError, match="expected a mapping of sections"):
        load_params(scalar)


def test_a_key_given_twice_is_refused_naming_the_file_and_the_key(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text((PROJECT_ROOT / "params.yaml").read_text() + "\nseed: 7\n")
    with pytest.raises(ParamsError, match=r"params.yaml: not valid YAML: .*duplicate key 'seed'"):
        load_params(path)
