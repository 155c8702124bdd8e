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


def test_project_root_is_the_working_folder_elsewhere(tmp_path):
    assert tracking.project_root(tmp_path / "project") == (tmp_path / "project").resolve()
