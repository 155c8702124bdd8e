"""Where runs go: the project's own store, also from DVC's temporary experiment workspaces."""

import mlflow

from alexnet8 import tracking


def test_runs_from_a_dvc_temporary_workspace_land_in_the_projects_store(tmp_path, monkeypatch):
    workspace = tmp_path / ".dvc" / "tmp" / "exps" / "tmpabc123"
    workspace.mkdir(parents=True)
    monkeypatch.chdir(workspace)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with tracking.start_pipeline_run("queued", "exp-1", workspace / "run.json"):
        mlflow.log_text("hello", "note.txt")
    assert (tmp_path / "mlflow.db").exists() and not (workspace / "mlflow.db").exists()
    experiment = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_experiment_by_name("queued")
    assert experiment.artifact_location == (tmp_path / "mlruns").as_uri()
    assert list((tmp_path / "mlruns").rglob("note.txt")) and not (workspace / "mlruns").exists()


def test_runs_started_in_a_project_land_in_its_own_store(tmp_path, monkeypatch):
    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.chdir(project)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with tracking.start_pipeline_run("local", "run-1", project / "run.json") as record:
        mlflow.log_text("hello", "note.txt")
    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    assert client.get_run(record["run_id"]).info.status == "FINISHED"
    assert client.get_experiment_by_name("local").artifact_location == (project / "mlruns").as_uri()
