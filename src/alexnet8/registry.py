"""The registered model's aliases: each evaluated version is the `candidate`; `champion` is the
version with the best test accuracy among those evaluated on the same test images.

Reads and writes the MLflow model registry (the tracking URI in use): version tags, descriptions
and aliases.

Versions are compared only on the test split of the same archive (its md5 is on each version),
scored through the served model, by the exact fraction of images right: a tie keeps the earlier
version. A version evaluated on another archive than the champion's is not compared (its tag
says so) and the champion stays. The registry has no lock: concurrent evaluations each write
their tags first, then move `champion` to the best version they read and read again until what
they read agrees, so the last one to write always wrote the best of all tagged versions.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from fractions import Fraction

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from alexnet8.errors import PipelineError

logger = logging.getLogger(__name__)

CANDIDATE = "candidate"
CHAMPION = "champion"
COMPARED_WITH_TAG = "champion.compared_with"
MAX_ROUNDS = 20  # alias writes one promotion may make while others race it (each round is one write)


class RegistryError(PipelineError):
    """The model registry answered an error: the aliases were left as they were."""


@dataclass(frozen=True)
class Evaluation:
    """A version's test result, as its tags hold it: images right of images scored, on an archive."""

    correct: int
    images: int
    archive_md5: str

    @property
    def accuracy(self) -> Fraction:
        return Fraction(self.correct, self.images)

    def tags(self) -> dict[str, str]:
        return {
            "test/accuracy": f"{float(self.accuracy):.4f}",
            "test/images_correct": str(self.correct),
            "test/images": str(self.images),
            "data.archive_md5": self.archive_md5,
        }

    @classmethod
    def from_tags(cls, tags: dict[str, str]) -> Evaluation | None:
        """The evaluation a version's tags record, or None for a version without one (an evaluation
        that did not finish, or one made before versions recorded their archive)."""
        try:
            return cls(int(tags["test/images_correct"]), int(tags["test/images"]), tags["data.archive_md5"])
        except (KeyError, ValueError):
            return None

    def describe(self) -> str:
        return (
            f"test accuracy {float(self.accuracy):.4f} ({self.correct} of {self.images} images, "
            f"archive md5 {self.archive_md5})"
        )


def promote(name: str, version: str, evaluation: Evaluation, client: mlflow.MlflowClient | None = None) -> bool:
    """Record `evaluation` on version `version` of `name`, make it the candidate, and settle the
    champion (see the module's docstring). Returns whether `version` is the champion.
    RegistryError, with the aliases untouched by this call, when the registry answers an error."""
    client = client or mlflow.MlflowClient()
    version = str(version)
    try:
        for key, value in evaluation.tags().items():  # first: they make the version a rival
            client.set_model_version_tag(name, version, key, value)
        before = _champion(client, name)  # before any alias is written: an error here leaves them all
        client.set_registered_model_alias(name, CANDIDATE, version)
        champion, compared = _settle_champion(client, name, version, evaluation, before)
        client.set_model_version_tag(name, version, COMPARED_WITH_TAG, compared)
    except MlflowException as error:
        raise RegistryError(
            f"the model registry at {mlflow.get_tracking_uri()} answered an error ({error.message}): "
            f"version {version} of {name} was not compared, and the champion was left as it was; "
            "rerun the evaluate stage once the registry answers"
        ) from None
    wins = champion == version
    logger.info(
        "%s version %s (%s) is the %s; compared with %s",
        name,
        version,
        evaluation.describe(),
        CHAMPION if wins else CANDIDATE,
        compared,
    )
    return wins


def _settle_champion(
    client: mlflow.MlflowClient, name: str, version: str, evaluation: Evaluation, before: str | None
) -> tuple[str | None, str]:
    """Move `champion` to the best version on `evaluation`'s archive until a read after the last
    write agrees. The champion at the end, and what `version` was compared with."""
    for _ in range(MAX_ROUNDS):
        current = _champion(client, name)
        rivals = _rivals(client, name, evaluation.archive_md5) | {version: evaluation}
        if current is not None and current not in rivals:
            return current, (
                f"not compared: champion version {current} was not evaluated on the archive with md5 "
                f"{evaluation.archive_md5}, so it stays"
            )
        best = max(rivals, key=lambda candidate: (rivals[candidate].accuracy, -int(candidate)))
        if current == best:
            return best, _comparison(version, before, rivals)
        client.set_registered_model_alias(name, CHAMPION, best)
    raise RegistryError(
        f"the champion alias of {name} kept changing under {MAX_ROUNDS} rounds of concurrent promotions: "
        "rerun the evaluate stage"
    )


def _comparison(version: str, before: str | None, rivals: dict[str, Evaluation]) -> str:
    """What `version` was compared with: the champion before it, in words."""
    if before is None:
        return "no champion before"
    if before == version:
        return "already the champion"
    if before not in rivals:
        return f"version {before}, which was not evaluated on this archive"
    tie = " (a tie: the earlier version stays)" if rivals[before].accuracy == rivals[version].accuracy else ""
    return f"version {before}: {rivals[before].describe()}{tie}"


def _champion(client: mlflow.MlflowClient, name: str) -> str | None:
    """The champion's version number, or None when the alias is not set. Any registry error
    propagates: only a missing alias means there is no champion."""
    champion = client.get_registered_model(name).aliases.get(CHAMPION)
    return None if champion is None else str(champion)


def _rivals(client: mlflow.MlflowClient, name: str, archive_md5: str) -> dict[str, Evaluation]:
    """Every version of `name` evaluated on the archive `archive_md5`, by version number."""
    rivals = {}
    versions: list[ModelVersion] = []
    page_token = None
    while True:
        page = client.search_model_versions(f"name = '{name}'", page_token=page_token)
        versions += page
        page_token = page.token
        if not page_token:
            break
    for model_version in versions:
        evaluation = Evaluation.from_tags(model_version.tags)
        if evaluation is not None and evaluation.archive_md5 == archive_md5:
            rivals[str(model_version.version)] = evaluation
    return rivals
