"""registry.py: which version is the champion, on what it was compared, and that two promotions
racing each other (real processes released together) always leave the better version champion,
on the local store and on a real `mlflow server`."""

from __future__ import annotations

import multiprocessing

import mlflow
import pytest
from helpers import TrackingServer
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR

from alexnet8.registry import CANDIDATE, CHAMPION, Evaluation, RegistryError, promote

ARCHIVE = "a" * 32
RACES = 20


def _versions(client: mlflow.MlflowClient, name: str, count: int) -> list[str]:
    """`count` versions of a new registered model, each from a run of its own (a server checks that)."""
    client.create_registered_model(name)
    experiment = client.get_experiment_by_name("Default").experiment_id
    versions = []
    for _ in range(count):
        run = client.create_run(experiment)
        source = f"{run.info.artifact_uri}/model"
        versions.append(str(client.create_model_version(name, source=source, run_id=run.info.run_id).version))
    return versions


def _alias(client: mlflow.MlflowClient, name: str, alias: str) -> str:
    return str(client.get_model_version_by_alias(name, alias).version)


def test_champion_moves_only_to_a_version_with_more_test_images_right():
    client = mlflow.MlflowClient()
    versions = _versions(client, "classifier", 3)
    assert promote("classifier", versions[0], Evaluation(60, 100, ARCHIVE))
    assert not promote("classifier", versions[1], Evaluation(55, 100, ARCHIVE))  # worse: candidate only
    assert (_alias(client, "classifier", CHAMPION), _alias(client, "classifier", CANDIDATE)) == tuple(versions[:2])
    tags = client.get_model_version("classifier", versions[1]).tags
    assert tags["champion.compared_with"] == (
        f"version 1: test accuracy 0.6000 (60 of 100 images, archive md5 {ARCHIVE})"
    )
    assert (tags["test/accuracy"], tags["test/images_correct"], tags["test/images"]) == ("0.5500", "55", "100")
    assert promote("classifier", versions[2], Evaluation(61, 100, ARCHIVE))
    assert _alias(client, "classifier", CHAMPION) == versions[2]


def test_a_tie_keeps_the_earlier_version_and_says_so():
    client = mlflow.MlflowClient()
    versions = _versions(client, "classifier", 2)
    promote("classifier", versions[0], Evaluation(3, 4, ARCHIVE))
    assert not promote("classifier", versions[1], Evaluation(75, 100, ARCHIVE))  # 0.75 both
    assert _alias(client, "classifier", CHAMPION) == versions[0]
    assert (
        "a tie: the earlier version stays"
        in client.get_model_version("classifier", versions[1]).tags["champion.compared_with"]
    )


def test_a_version_scored_on_another_archive_is_not_compared_and_the_champion_stays():
    client = mlflow.MlflowClient()
    versions = _versions(client, "classifier", 2)
    promote("classifier", versions[0], Evaluation(10, 100, ARCHIVE))
    assert not promote("classifier", versions[1], Evaluation(99, 100, "b" * 32))
    assert _alias(client, "classifier", CHAMPION) == versions[0]
    assert _alias(client, "classifier", CANDIDATE) == versions[1]
    compared = client.get_model_version("classifier", versions[1]).tags["champion.compared_with"]
    assert compared.startswith("not compared: champion version 1 was not evaluated on the archive with md5 bbbb")


class _RegistryDown(mlflow.MlflowClient):
    """A real client whose registry answers reads of the registered model with an internal error."""

    def get_registered_model(self, name):
        raise MlflowException("the database is locked", error_code=INTERNAL_ERROR)


def test_a_registry_error_other_than_no_alias_fails_and_leaves_the_aliases_untouched():
    client = mlflow.MlflowClient()
    versions = _versions(client, "classifier", 2)
    promote("classifier", versions[0], Evaluation(10, 100, ARCHIVE))
    with pytest.raises(RegistryError, match="answered an error \\(the database is locked\\).*champion was left"):
        promote("classifier", versions[1], Evaluation(90, 100, ARCHIVE), client=_RegistryDown())
    assert client.get_registered_model("classifier").aliases == {CANDIDATE: 1, CHAMPION: 1}


def _promoter(tracking_uri: str, barrier, jobs: list[tuple[str, str, int]], results) -> None:
    """In a process of its own: for each race, wait at the barrier with the rival, then promote."""
    mlflow.set_tracking_uri(tracking_uri)
    for name, version, correct in jobs:
        barrier.wait(timeout=120)
        promote(name, version, Evaluation(correct, 1000, ARCHIVE))
    results.put("done")


def _race(tracking_uri: str, races: int = RACES) -> None:
    """`races` registered models, each with a champion and two better versions promoted at the same
    instant by two processes; in half of them the better one is the first process's. Every race
    must end with the best version as champion."""
    mlflow.set_tracking_uri(tracking_uri)
    client = mlflow.MlflowClient()
    context = multiprocessing.get_context("spawn")  # a fresh interpreter each, as two stages are
    barrier, results = context.Barrier(2), context.Queue()
    jobs: list[list[tuple[str, str, int]]] = [[], []]
    best = {}
    for race in range(races):
        name = f"race-{race}"
        first, second, third = _versions(client, name, 3)
        promote(name, first, Evaluation(500, 1000, ARCHIVE))
        better, worse = (700, 600) if race % 2 else (600, 700)
        jobs[0].append((name, second, better))
        jobs[1].append((name, third, worse))
        best[name] = second if better > worse else third
    processes = [context.Process(target=_promoter, args=(tracking_uri, barrier, job, results)) for job in jobs]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=600)
    assert [process.exitcode for process in processes] == [0, 0]
    champions = {name: _alias(client, name, CHAMPION) for name in best}
    assert champions == best


def test_racing_promotions_on_the_local_store_leave_the_better_version_champion(tmp_path):
    _race(f"sqlite:///{tmp_path / 'mlflow.db'}")


@pytest.mark.slow
def test_racing_promotions_on_a_tracking_server_leave_the_better_version_champion(tmp_path):
    server = TrackingServer(tmp_path)
    server.start()
    try:
        _race(server.uri)
    finally:
        server.kill()
