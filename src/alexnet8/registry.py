"""The registered model's aliases: each evaluated version is the `candidate`; `champion` moves to it
only when its test accuracy beats the champion's.

Reads and writes the MLflow model registry (the tracking URI in use): version tags and aliases.
"""

from __future__ import annotations

import logging

import mlflow
from mlflow.exceptions import MlflowException

logger = logging.getLogger(__name__)

CANDIDATE = "candidate"
CHAMPION = "champion"
TEST_ACCURACY_TAG = "test_accuracy"


def _champion(client: mlflow.MlflowClient, name: str):
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None  # no champion yet


def promote(name: str, version: str, test_accuracy: float) -> bool:
    """Tag version `version` of `name` with its test accuracy and make it the candidate; make it the
    champion if there is none or it beats the champion's test accuracy. Returns whether it did.
    The version's tag `champion.compared_with` says what it was compared with."""
    client = mlflow.MlflowClient()
    client.set_model_version_tag(name, version, TEST_ACCURACY_TAG, f"{test_accuracy:.6f}")
    client.set_registered_model_alias(name, CANDIDATE, version)
    champion = _champion(client, name)
    champion_accuracy = float(champion.tags.get(TEST_ACCURACY_TAG, "-inf")) if champion else None
    if champion is None:
        compared, wins = "no champion before", True
    elif str(champion.version) == str(version):
        compared, wins = "already the champion", True
    else:
        compared = f"version {champion.version} (test accuracy {champion_accuracy:.4f})"
        wins = test_accuracy > champion_accuracy
    client.set_model_version_tag(name, version, "champion.compared_with", compared)
    if wins:
        client.set_registered_model_alias(name, CHAMPION, version)
    logger.info(
        "%s version %s (test accuracy %.4f) is the %s; compared with %s",
        name,
        version,
        test_accuracy,
        CHAMPION if wins else CANDIDATE,
        compared,
    )
    return wins
