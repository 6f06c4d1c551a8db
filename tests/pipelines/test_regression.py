"""The regression trainer: deterministic runs, a split shared by baseline and GAL, loud failures."""
import json
import subprocess
import sys

import numpy as np
import pytest
from hydra import compose, initialize

from pipelines.tasks import regression
from pipelines.tasks import RunError


@pytest.fixture
def root(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("DVC_STAGE", raising=False)
    rng = np.random.default_rng(0)
    X = rng.normal(size=(80, 13))
    y = X @ rng.normal(size=13) + 0.1 * rng.normal(size=80) + 20
    (tmp_path / "data" / "processed").mkdir(parents=True)
    np.savez(tmp_path / "data" / "processed" / "boston.npz", X=X, y=y, feature_names=np.array(["f"] * 13))
    return tmp_path


def config(root, *overrides):
    with initialize(config_path="../../pipelines/conf", version_base="1.3"):
        return compose("train", overrides=[f"root={root}", "task.epochs=3", "data=boston", *overrides])


def record(root, name):
    run = root / "runs" / "regression" / name
    return json.loads((run / "metrics.json").read_text()), (run / "history.csv").read_text()


def test_same_seed_gives_identical_metrics_twice(root):
    regression.run(config(root, "method=gal", "seed=1"))
    first = record(root, "boston-gal-s1")
    regression.run(config(root, "method=gal", "seed=1"))
    assert record(root, "boston-gal-s1") == first
    regression.run(config(root, "method=gal", "seed=2"))
    assert record(root, "boston-gal-s2")[0] != first[0]


def test_gal_and_baseline_runs_log_their_columns(root):
    regression.run(config(root, "method=baseline", "seed=0"))
    regression.run(config(root, "method=gal", "seed=0"))
    baseline_metrics, baseline_history = record(root, "boston-baseline-s0")
    gal_metrics, gal_history = record(root, "boston-gal-s0")
    assert set(baseline_metrics) == set(gal_metrics) == {"test_mae", "test_mse", "test_r2"}
    assert baseline_history.splitlines()[0] == "epoch,train_loss,test_mae,test_mse,test_r2,lr"
    assert {"remainder", "accepted", "cosine", "adjusted_better"} <= set(gal_history.splitlines()[0].split(","))
    assert len(gal_history.splitlines()) == 1 + 3


def test_split_depends_on_the_seed_alone():
    train, test = regression.split(100, 0.2, seed=4)
    assert len(test) == 20 and not set(train) & set(test) and len(train) + len(test) == 100
    assert all(np.array_equal(a, b) for a, b in zip(regression.split(100, 0.2, seed=4), (train, test)))
    assert not np.array_equal(regression.split(100, 0.2, seed=5)[1], test)


def test_missing_data_is_one_clear_line_and_no_run_record(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    with pytest.raises(RunError, match="boston.npz is missing: run `dvc repro`"):
        regression.run(config(tmp_path))
    result = subprocess.run([sys.executable, "-m", "pipelines.train", f"root={tmp_path}", "data=diabetes"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "diabetes.npz is missing" in result.stderr and not (tmp_path / "runs").exists()
