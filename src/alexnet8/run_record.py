"""The run file: which MLflow run a training logged to (`models/mlflow_run.json`, `--run-file` in
dvc.yaml), the contract between the train stage and the steps that log into or read that run.

Reads: a run file, for the stages and tools after training (evaluate, plot, reproduce; a
checkpoint's copy for a resumed training). Writes: a run file, for tracking.start_pipeline_run.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from alexnet8.errors import DataError, validation_problems
from alexnet8.files import write_json


class RunRecord(BaseModel):
    """The training's MLflow run. Fields other steps add later (a registered version, a
    reproduction, the workers of a cluster) are kept as they are: extra fields are allowed."""

    model_config = ConfigDict(extra="allow")

    run_id: str = Field(min_length=1)
    experiment_id: str | None = None
    tracking_uri: str | None = None


def write_run_file(path: str | Path, record: RunRecord) -> None:
    write_json(path, record.model_dump(exclude_none=True))


def run_record_problem(content: str | bytes) -> str | None:
    """What is wrong with a run file's content, or None when it is a valid record."""
    try:
        RunRecord.model_validate_json(content)
    except ValidationError as error:
        return validation_problems(error)
    return None


def read_run_file(path: str | Path) -> RunRecord:
    """The record the train stage wrote in `path`; DataError naming the file when it is missing or wrong."""
    path = Path(path)
    try:
        content = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path} not found: run the train stage first") from None
    problem = run_record_problem(content)
    if problem is not None:
        raise DataError(f"{path}: not a run file written by the train stage ({problem})")
    return RunRecord.model_validate_json(content)
