"""Load `params.yaml` and validate it, once, into typed, frozen objects.

Reads: params.yaml (path given by the caller). Writes: nothing.

Every stage calls `load_params` before doing any work, so a typo, a missing key or a value out
of range stops the pipeline at once with an error naming the key, never an hour into training.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlparse

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator

from alexnet8.errors import ParamsError

SUPPORTED_URL_SCHEMES = ("http", "https", "file")


def _number(value: object) -> object:
    """Accept `1e-3` written in YAML: PyYAML reads it as a string (YAML 1.1), DVC writes a float."""
    if isinstance(value, bool):
        raise ValueError("expected a number, got a boolean")
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"expected a number, got {value!r}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"expected a finite number, got {value!r}")
    return value


Number = Annotated[float, BeforeValidator(_number)]


def _bool_or(word: str) -> BeforeValidator:
    """true, false or `word`, and nothing that merely equals them (1 == True in Python)."""

    def validate(value: object) -> object:
        if value is True or value is False or value == word:
            return value
        raise ValueError(f"expected true, false or {word}, got {value!r}")

    return BeforeValidator(validate)


BoolOrAuto = Annotated[bool | str, _bool_or("auto")]
BoolOrAlternating = Annotated[bool | str, _bool_or("alternating")]


class _Section(BaseModel):
    # strict: 5.0 is not an int and "5" is not an int; extra: a misspelt key is an error, not ignored.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class FetchParams(_Section):
    url: str = Field(min_length=1)
    md5: Annotated[str, Field(pattern=r"^[0-9a-fA-F]{32}$")]

    @field_validator("url")
    @classmethod
    def _supported_url(cls, url: str) -> str:
        scheme = urlparse(url).scheme
        # A one-letter "scheme" is a Windows drive letter, i.e. a local path.
        if scheme and len(scheme) > 1 and scheme not in SUPPORTED_URL_SCHEMES:
            raise ValueError(
                f"unsupported URL scheme {scheme!r}: use one of {', '.join(SUPPORTED_URL_SCHEMES)}, or a local path"
            )
        return url


class PreprocessParams(_Section):
    validation_fraction: Annotated[Number, Field(gt=0, lt=1)]
    normalization: Literal["unit", "standardize"]


class TrainParams(_Section):
    epochs: Annotated[int, Field(gt=0)]
    batch_size: Annotated[int, Field(gt=0)]
    optimizer: Literal["adam", "adamw", "sgd"]
    learning_rate: Annotated[Number, Field(gt=0)]
    lr_batch_scaling: Literal["none", "linear", "sqrt"]
    lr_reference_batch_size: Annotated[int, Field(gt=0)]
    lr_schedule: Literal["constant", "warmup_cosine"]
    warmup_fraction: Annotated[Number, Field(ge=0, lt=1)]
    momentum: Annotated[Number, Field(ge=0, lt=1)]
    weight_decay: Annotated[Number, Field(ge=0)]
    decay_norm_and_bias: bool
    ema_momentum: Annotated[Number, Field(ge=0, lt=1)]
    batch_norm_refit_images: Annotated[int, Field(ge=0)]
    random_flip: BoolOrAlternating
    random_crop_padding: Annotated[int, Field(ge=0, le=16)]
    cutout_size: Annotated[int, Field(ge=0, le=32)]
    label_smoothing: Annotated[Number, Field(ge=0, lt=1)]
    dropout: Annotated[Number, Field(ge=0, lt=1)]
    dense_units: Annotated[int, Field(gt=0)]
    batch_norm_momentum: Annotated[Number, Field(gt=0, lt=1)]
    whitening_images: Annotated[int, Field(ge=0)]
    jit_compile: BoolOrAuto
    fused_batch_norm: bool
    fused_optimizer: bool
    precision: Literal["float32", "mixed_float16", "mixed_bfloat16"]
    deterministic: bool

    @property
    def peak_learning_rate(self) -> float:
        """`learning_rate` scaled to the batch size as `lr_batch_scaling` asks (linear: Goyal et al., 2017)."""
        ratio = self.batch_size / self.lr_reference_batch_size
        return self.learning_rate * {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[self.lr_batch_scaling]


class EvaluateParams(_Section):
    batch_size: Annotated[int, Field(gt=0)]
    flip_tta: bool
    tta_translate: Annotated[int, Field(ge=0, le=8)]


class MlflowParams(_Section):
    experiment_name: str = Field(min_length=1)
    registered_model_name: str


class Params(_Section):
    seed: Annotated[int, Field(ge=0, lt=2**32)]  # NumPy's and TensorFlow's generators take 32-bit seeds
    fetch: FetchParams
    preprocess: PreprocessParams
    train: TrainParams
    evaluate: EvaluateParams
    mlflow: MlflowParams

    def flat(self) -> dict[str, object]:
        """All params as `section.key` -> value, as `dvc params diff` names them."""
        flat: dict[str, object] = {}
        for key, value in self.model_dump().items():
            if isinstance(value, dict):
                flat.update({f"{key}.{inner}": inner_value for inner, inner_value in value.items()})
            else:
                flat[key] = value
        return flat


def with_overrides(raw: dict, overrides: dict[str, object]) -> dict:
    """A copy of loaded params with `section.key` values set, as `dvc exp run -S` sets them. The
    result is not validated (parse_params does that); a section that does not exist is an error."""
    merged = copy.deepcopy(raw)
    for dotted, value in overrides.items():
        *sections, key = dotted.split(".")
        target = merged
        for section in sections:
            if not isinstance(target.get(section), dict):
                raise ParamsError(f"{dotted}: unknown section {section!r} (see params.yaml)")
            target = target[section]
        target[key] = value
    return merged


def _describe(error: dict) -> str:
    key = ".".join(str(part) for part in error["loc"]) or "(top level)"
    message = error["msg"]
    if error["type"] == "missing":
        return f"{key}: missing"
    if error["type"] == "extra_forbidden":
        return f"{key}: unknown key (misspelt? see params.yaml for the valid keys)"
    return f"{key}: {message} (got {error['input']!r})"


def parse_params(raw: object, source: str = "params.yaml") -> Params:
    """Validate already-loaded YAML. Raises ParamsError listing every bad key."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as error:
        problems = "\n".join(f"  {_describe(item)}" for item in error.errors())
        raise ParamsError(f"{source}: invalid params:\n{problems}") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key that appears twice in one mapping (as DVC does)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str, source: str) -> object:
    """YAML text's content. Raises ParamsError naming `source`: not YAML, or a duplicate key."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as error:
        raise ParamsError(f"{source}: not valid YAML: {error}") from None


def read_yaml(path: str | Path) -> object:
    """A YAML file's content. Raises ParamsError naming the file: unreadable, not YAML, a duplicate key."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ParamsError(f"{path}: cannot read params file: {error.strerror}") from None
    return parse_yaml(text, source=str(path))


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate a params file. Raises ParamsError naming the file and the bad keys."""
    return parse_params(read_yaml(path), source=str(path))
