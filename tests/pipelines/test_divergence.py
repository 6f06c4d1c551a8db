"""A run that diverges (a NaN/inf metric): by default it fails loudly and leaves no record; with
trainer.on_divergence=record it is a result: a whole record with diverged_epoch, the MLflow run FAILED with
tags, one printed line, exit code 0, and a rerun that starts over. Also under DDP: every rank stops together."""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess

import pytest
from mlflow.tracking import MlflowClient

from pipelines.errors import ConfigError
from pipelines.report.records import load_run
from pipelines.tasks.regression import task as regression
from tests.pipelines.train_helpers import run_name, train_config, train_env, with_data
from tests.pipelines.train_helpers import train as train_command

# Plain SGD at lr 1.5 on the Boston fixture: finite for two epochs, train_loss inf in epoch 3 (checked below).
# (Adam's step is bounded by its lr: even at lr 1e10 the loss overflows within epoch 1, leaving no finite epoch.)
DIVERGES = ("optim=sgd", "optim.lr=1.5", "task.epochs=5")
RECORD = "trainer.on_divergence=record"
RUN_JSON = {"task", "run_name", "variant", "mlflow_run_id", "mlflow_experiment_id", "tracking_uri", "stage",
            "git_commit", "git_dirty", "git_diff_sha256", "git_untracked", "profile", "data_checksums",
            "env_lock_sha256", "created"}  # a finished run's run.json (tests/pipelines/test_tracking.py)


def config(root, *overrides, experiment="boston_baseline"):
    return train_config(f"root={root}", f"experiment={experiment}", *overrides)


def name_of(root, *overrides) -> str:
    return run_name(config(root, *overrides))


def train(root, *overrides) -> subprocess.CompletedProcess:
    """The Boston baseline from the stage command, in this (the ``root`` fixture's) environment."""
    return train_command(root, "experiment=boston_baseline", *overrides, timeout=300)


def mlflow_runs(task: str = "regression") -> list:
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    return client.search_runs([client.get_experiment_by_name(task).experiment_id], order_by=["start_time ASC"])


def line(name: str, epoch: int, metric: str, value: str) -> str:
    return f"{name} diverged at epoch {epoch} ({metric} = {value}): recorded as a result (trainer.on_divergence=record)"


def test_by_default_a_divergence_fails_loudly_without_a_record(boston_root):
    result = train(boston_root, *DIVERGES)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "train regression: metric 'train_loss' is inf at epoch 3: the run diverged; lower the learning rate or "
        "check the data"]
    assert not (boston_root / "runs").exists()
    assert [run.info.status for run in mlflow_runs()] == ["FAILED"]


@pytest.mark.slow
def test_a_recorded_divergence_is_a_whole_record_a_failed_mlflow_run_and_exit_code_0(boston_root):
    name = name_of(boston_root, *DIVERGES)
    result = train(boston_root, *DIVERGES, RECORD)
    assert result.returncode == 0, result.stderr
    assert line(name, 3, "train_loss", "inf") in result.stdout.splitlines()
    assert "epoch 3/5" not in result.stdout and result.stderr == ""

    run_dir = boston_root / "runs" / "regression" / name
    assert {"config.yaml", "history.csv", "metrics.json", "run.json"} <= {p.name for p in run_dir.iterdir()}
    assert json.loads((run_dir / "metrics.json").read_text()) == {"diverged_epoch": 3}
    with open(run_dir / "history.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["epoch"] for row in rows] == ["1", "2"]  # the finite epochs only
    assert all(math.isfinite(float(value)) for row in rows for value in row.values())
    meta = json.loads((run_dir / "run.json").read_text())
    assert set(meta) == RUN_JSON | {"status", "diverged_metric"}
    assert meta["status"] == "diverged" and meta["diverged_metric"] == "train_loss"
    record = load_run(run_dir)
    assert record.diverged_epoch == 3 and record.get("trainer.on_divergence") == "record"

    (run,) = mlflow_runs()
    assert run.info.run_id == meta["mlflow_run_id"] and run.info.status == "FAILED"
    assert run.data.tags["diverged_epoch"] == "3" and run.data.tags["diverged_metric"] == "train_loss"
    assert run.data.metrics["diverged_epoch"] == 3.0  # metrics.json and MLflow agree (the audit's cross-check)
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1, 2]
    assert not (boston_root / "checkpoints" / "regression" / name / "last.pt").exists()

    # a rerun of the same config starts over (no checkpoint to resume towards the same NaN) and records the
    # same result again, in a new MLflow run
    before = {p: (run_dir / p).read_text() for p in ("history.csv", "metrics.json")}
    again = train(boston_root, *DIVERGES, RECORD)
    assert again.returncode == 0, again.stderr
    assert "resuming" not in again.stdout and line(name, 3, "train_loss", "inf") in again.stdout.splitlines()
    assert {p: (run_dir / p).read_text() for p in before} == before
    first, second = mlflow_runs()
    assert first.info.run_id == run.info.run_id and [first.info.status, second.info.status] == ["FAILED", "FAILED"]
    assert json.loads((run_dir / "run.json").read_text())["mlflow_run_id"] == second.info.run_id


def test_a_finished_run_with_record_is_an_ordinary_run(boston_root):
    regression.run(config(boston_root, "task.epochs=2", RECORD))
    record = load_run(boston_root / "runs" / "regression" / name_of(boston_root, "task.epochs=2"))
    assert record.diverged_epoch is None and "status" not in record.meta
    assert set(record.metrics) == {"test_mae", "test_mse", "test_r2"}
    assert [run.info.status for run in mlflow_runs()] == ["FINISHED"]


@pytest.mark.parametrize("overrides, epoch, metric, value", [
    (("optim.lr=1e10", "task.epochs=3"), 1, "train_loss", "inf"),  # Adam: overflows in the first epoch
    (("optim=sgd", "optim.lr=2", "task.epochs=3"), 2, "test_mse", "inf"),  # a finite train_loss, an inf test_mse
])
def test_any_nonfinite_metric_at_any_epoch_is_recorded(boston_root, capsys, overrides, epoch, metric, value):
    regression.run(config(boston_root, *overrides, RECORD))
    name = name_of(boston_root, *overrides)
    assert capsys.readouterr().out.splitlines()[-1] == line(name, epoch, metric, value)
    run_dir = boston_root / "runs" / "regression" / name
    record = load_run(run_dir)
    assert record.diverged_epoch == epoch and record.metrics == {"diverged_epoch": epoch}
    assert record.meta["diverged_metric"] == metric
    assert len((run_dir / "history.csv").read_text().splitlines()) == epoch  # header + the finite epochs
    (run,) = mlflow_runs()
    assert run.info.status == "FAILED" and run.data.tags["diverged_metric"] == metric


def test_a_bad_on_divergence_is_one_line_before_any_compute(boston_root):
    with pytest.raises(ConfigError, match=r"trainer.on_divergence='maybe': use fail or record"):
        regression.run(config(boston_root, "trainer.on_divergence=maybe"))
    result = train(boston_root, "trainer.on_divergence=maybe")
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "train regression: bad config: trainer.on_divergence='maybe': use fail or record"]
    assert not (boston_root / "runs").exists() and not (boston_root / "checkpoints").exists()
    assert not (boston_root / "mlflow.db").exists()


@pytest.mark.slow
def test_under_ddp_every_rank_stops_at_the_divergence_and_the_run_is_recorded(tmp_path, prepared_cifar10):
    """2 gloo processes: rank 0 decides, the other rank stops with it (no hang in a collective), exit code 0."""
    with_data(tmp_path, prepared_cifar10)
    env = train_env(tmp_path, OMP_NUM_THREADS="1")
    overrides = ["experiment=cifar10_sgd_gal", "optim.lr=1e12", "method.ratio=0", "task.max_steps=3",
                 "task.epochs=3", "trainer.device=cpu", "trainer.gpus=2", RECORD]
    result = train_command(tmp_path, *overrides, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "launching 2 processes" in result.stdout and " diverged at epoch 1 (" in result.stdout
    (run_dir,) = (tmp_path / "runs" / "classification").iterdir()
    record = load_run(run_dir)
    assert record.diverged_epoch == 1 and record.meta["status"] == "diverged"
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    (run,) = client.search_runs([client.get_experiment_by_name("classification").experiment_id])
    assert run.info.status == "FAILED" and run.data.tags["diverged_epoch"] == "1"
