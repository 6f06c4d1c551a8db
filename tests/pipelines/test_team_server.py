"""A team's MLflow server: a real `mlflow server` with a database, an artifact store and basic auth on
127.0.0.1. A smoke run logs to it with credentials from the environment and shows in MLflow's own views
(source tags, dataset inputs, record and loss-curve artifacts, system metrics); the credentials appear in
no output line, tag, param, artifact or run record; a wrong password fails at the start in one line."""
from __future__ import annotations

import hashlib
import json
import secrets
import subprocess
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.network import mlflow_server
from tests.pipelines.train_helpers import ROOT, train, train_env, write_boston

USER, PASSWORD = f"gal-admin-{secrets.token_hex(4)}", f"pw-{secrets.token_hex(12)}"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    store = tmp_path_factory.mktemp("team")
    (store / "auth.ini").write_text(
        "[mlflow]\ndefault_permission = EDIT\n"
        f"database_uri = sqlite:///{store / 'basic_auth.db'}\n"
        f"admin_username = {USER}\nadmin_password = {PASSWORD}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    env = {"MLFLOW_AUTH_CONFIG_PATH": str(store / "auth.ini"), "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16)}
    with mlflow_server(store, "--app-name", "basic-auth", env=env) as uri:
        yield uri


def team_env(root: Path, uri: str, password: str) -> dict:
    """A stage's environment that logs to the team's server at ``uri`` as USER with ``password``."""
    return train_env(root, MLFLOW_TRACKING_URI=uri, MLFLOW_TRACKING_USERNAME=USER, MLFLOW_TRACKING_PASSWORD=password,
                     MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL="0.2")


@pytest.mark.slow
def test_a_run_shows_in_mlflows_views_and_its_credentials_go_nowhere(server, tmp_path, monkeypatch):
    write_boston(tmp_path, rows=3000)  # a few seconds of training: system metrics get sampled
    done = train(tmp_path, "experiment=boston_gal", "task.epochs=4", "trainer.system_metrics=true",
                 env=team_env(tmp_path, server, PASSWORD))
    assert done.returncode == 0, done.stderr
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    client = MlflowClient(server)
    (run,) = client.search_runs([client.get_experiment_by_name("regression").experiment_id])
    tags = run.data.tags
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert tags["mlflow.source.name"] == "pipelines/train.py" and tags["mlflow.source.type"] == "LOCAL"
    assert tags["mlflow.source.git.commit"] == head and tags["mlflow.user"]
    data = tmp_path / "data/processed/boston.npz"
    (dataset,) = run.inputs.dataset_inputs
    assert dataset.dataset.name == data.as_posix() and dataset.tags[0].value == "training"
    assert dataset.dataset.digest == hashlib.md5(data.read_bytes()).hexdigest()
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "record" in artifacts
    local = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / "downloaded")))
    record = tmp_path / "runs/regression/boston-gal-epochs4-s0"
    for name in ("config.yaml", "history.csv", "metrics.json", "run.json"):
        assert (local / "record" / name).read_bytes() == (record / name).read_bytes(), name
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(run.data.metrics)
    texts = [done.stdout, done.stderr, json.dumps(tags), json.dumps(run.data.params)]
    texts += [p.read_bytes().decode(errors="replace") for p in [*record.rglob("*"), *local.rglob("*")] if p.is_file()]
    assert not any(secret in text for text in texts for secret in (USER, PASSWORD))


def test_a_wrong_password_fails_at_the_start_in_one_line(server, tmp_path):
    write_boston(tmp_path)
    done = train(tmp_path, "experiment=boston_gal", env=team_env(tmp_path, server, "not-the-password"))
    assert done.returncode == 2 and done.stdout == "" and done.stderr.count("\n") == 1, done.stdout + done.stderr
    assert "refused the credentials (HTTP 401)" in done.stderr and "not-the-password" not in done.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "checkpoints").exists()
