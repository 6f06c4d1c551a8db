"""pipelines.tracking against real MLflow: a local sqlite store and a real `mlflow server` over HTTP."""
from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from pipelines.tracking.provenance import data_checksum
from pipelines.tracking.run import RunTracker
from pipelines.errors import TrackingError
from pipelines.tracking.store import check_tracking_server, logged_metrics, tracking_uri
from tests.network import free_port

REPO = Path(__file__).resolve().parents[2]

JOURNAL = Path("history.jsonl")  # a resumable run's journal (relative: each test has its own cwd)
CONFIG = {"model": {"hidden": [64, 64], "lr": 0.01, "act": "relu"}, "data": {"name": "boston"},
          "seed": 0, "long": "x" * 600, "many": {f"k{i:03d}": i for i in range(150)}}  # > one param batch
EPOCHS = [{"train_loss": 1.0, "val_mae": 0.9}, {"train_loss": 0.5, "val_mae": 0.6, "lr": 0.01},
          {"train_loss": 0.25, "val_mae": 0.4}]
FINAL = {"test_mae": 0.41, "test_mse": 0.3, "test_r2": 0.8}


@pytest.fixture(autouse=True)
def env(store_env) -> Path:
    return store_env


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real `mlflow server` on a free local port; yields its URI; terminated at the end of the module."""
    tmp = tmp_path_factory.mktemp("server")
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    log = open(tmp / "server.log", "wb")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_") and "proxy" not in k.lower()}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no job-runner processes: halves the start on 2 cores
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{(tmp / 'srv.db').as_posix()}",
         "--artifacts-destination", (tmp / "art").as_posix()],  # artifacts go through the server (proxied)
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp, start_new_session=True)
    start = time.monotonic()
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {proc.returncode}: "
                                   + (tmp / "server.log").read_text()[-2000:])
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() - start > 90:
                raise RuntimeError("mlflow server did not answer /health in 90 s: "
                                   + (tmp / "server.log").read_text()[-2000:])
            time.sleep(0.25)
        print(f"mlflow server up in {time.monotonic() - start:.1f} s", file=sys.stderr)
        yield uri
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the server and its workers: its own session
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()


def run_three_epochs(data_files=(), final=FINAL, **kwargs) -> RunTracker:
    with RunTracker("regression", "boston-gal-s0", CONFIG, profile="smoke", journal=JOURNAL, data_files=data_files,
                    **kwargs) as tracker:
        for epoch, metrics in enumerate(EPOCHS, start=1):
            tracker.log_epoch(epoch, metrics)
        tracker.log_final(final)
    return tracker


def md5(data: bytes) -> str:
    return "md5:" + hashlib.md5(data).hexdigest()


def check_mlflow_run(client: MlflowClient, tracker: RunTracker, data: bytes) -> None:
    exp = client.get_experiment_by_name("regression")
    assert exp is not None and exp.experiment_id == tracker.experiment_id
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI's model-training view
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "boston-gal-s0"
    assert run.info.experiment_id == exp.experiment_id
    params = run.data.params
    assert params["model.lr"] == "0.01" and params["model.act"] == "relu" and params["model.hidden"] == "[64, 64]"
    assert params["data.name"] == "boston" and params["seed"] == "0"
    assert params["many.k149"] == "149" and sum(k.startswith("many.") for k in params) == 150
    assert params["long"].startswith("xxx") and len(params["long"]) <= 500
    history = client.get_metric_history(tracker.run_id, "train_loss")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [(1, 1.0), (2, 0.5), (3, 0.25)]
    assert [(m.step, m.value) for m in client.get_metric_history(tracker.run_id, "lr")] == [(2, 0.01)]
    for name, value in FINAL.items():
        assert run.data.metrics[name] == value
    tags = run.data.tags
    assert tags["git_commit"] == "unknown" and tags["git_dirty"] == "unknown"  # tmp_path is outside git
    assert tags["dvc_stage"] == "manual" and tags["profile"] == "smoke" and tags["variant"] == ""
    artifacts = {a.path for a in client.list_artifacts(tracker.run_id)}
    assert "git_diff_sha256" not in tags and "provenance" not in artifacts  # no git: no diff
    # MLflow's own views: the record as artifacts, the standard tags, the data as inputs
    assert artifacts == {"record"}
    assert {a.path for a in client.list_artifacts(tracker.run_id, "record")} == {
        f"record/{name}" for name in ("config.yaml", "history.csv", "metrics.json", "run.json")}
    assert tags["mlflow.source.type"] == "LOCAL" and tags["mlflow.user"] and "mlflow.source.git.commit" not in tags
    (dataset,) = run.inputs.dataset_inputs
    assert (dataset.dataset.name, "md5:" + dataset.dataset.digest) == ("data/processed/boston.npz", md5(data))
    assert tags["env_lock_sha256"] == hashlib.sha256(b"torch==2\n").hexdigest()
    assert tags["data.data/processed/boston.npz"] == md5(data)


def make_inputs(root: Path) -> tuple[Path, bytes]:
    (root / "requirements.lock").write_bytes(b"torch==2\n")
    data = os.urandom(3000)
    path = root / "data" / "processed" / "boston.npz"
    path.parent.mkdir(parents=True)
    path.write_bytes(data)
    return Path("data/processed/boston.npz"), data


def test_successful_run_writes_record_and_mlflow(env, sqlite_uri):
    data_file, data = make_inputs(env)
    tracker = run_three_epochs([data_file])
    run_dir = env / "runs" / "regression" / "boston-gal-s0"
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml", "history.csv", "metrics.json", "run.json"]
    assert [p.name for p in run_dir.parent.iterdir()] == ["boston-gal-s0"]  # no temp dirs left behind

    assert yaml.safe_load((run_dir / "config.yaml").read_text()) == CONFIG
    with open(run_dir / "history.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows == [["epoch", "train_loss", "val_mae", "lr"], ["1", "1.0", "0.9", ""], ["2", "0.5", "0.6", "0.01"],
                    ["3", "0.25", "0.4", ""]]
    assert json.loads((run_dir / "metrics.json").read_text()) == FINAL
    record = json.loads((run_dir / "run.json").read_text())
    assert set(record) == {"task", "run_name", "variant", "mlflow_run_id", "mlflow_experiment_id", "tracking_uri",
                           "stage", "git_commit", "git_dirty", "git_diff_sha256", "git_untracked", "profile",
                           "data_checksums", "env_lock_sha256", "created"}
    assert record["task"] == "regression" and record["run_name"] == "boston-gal-s0" and record["variant"] == ""
    assert record["mlflow_run_id"] == tracker.run_id and record["mlflow_experiment_id"] == tracker.experiment_id
    assert record["tracking_uri"] == sqlite_uri and record["stage"] == "manual" and record["profile"] == "smoke"
    assert record["git_commit"] == "unknown" and record["git_dirty"] is None
    assert record["git_diff_sha256"] is None and record["git_untracked"] is None
    assert record["data_checksums"] == {"data/processed/boston.npz": md5(data)}
    assert record["env_lock_sha256"] == hashlib.sha256(b"torch==2\n").hexdigest()
    assert record["created"].endswith("+00:00") and record["created"][:4].isdigit()

    check_mlflow_run(MlflowClient(sqlite_uri), tracker, data)
    # Artifacts beside the sqlite file whatever the cwd (MLflow's default: ./mlruns of the cwd).
    store = Path(sqlite_uri[len("sqlite:///"):]).parent
    experiment = MlflowClient(sqlite_uri).get_experiment(tracker.experiment_id)
    assert experiment.artifact_location == (store / "mlartifacts" / "regression").as_uri()
    assert not (env / "mlruns").exists()


def test_exception_fails_run_and_keeps_previous_record(env, sqlite_uri):
    run_dir = env / "runs" / "regression" / "boston-gal-s0"
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.json").write_text('{"test_mae": 1.5}\n')
    with pytest.raises(ValueError, match="boom"):
        with RunTracker("regression", "boston-gal-s0", CONFIG, profile="smoke", journal=JOURNAL) as tracker:
            tracker.log_epoch(1, {"train_loss": 1.0})
            raise ValueError("boom")
    run = MlflowClient(sqlite_uri).get_run(tracker.run_id)
    assert run.info.status == "FAILED"
    assert run.data.metrics == {"train_loss": 1.0}  # what it logged before failing is kept in MLflow
    assert [p.name for p in run_dir.iterdir()] == ["metrics.json"]
    assert (run_dir / "metrics.json").read_text() == '{"test_mae": 1.5}\n'
    assert [p.name for p in run_dir.parent.iterdir()] == ["boston-gal-s0"]


def test_nan_metric_fails_loudly(env, sqlite_uri):
    with pytest.raises(TrackingError, match=r"'train_loss' is nan at epoch 2") as err:
        with RunTracker("regression", "boston-gal-s0", CONFIG, profile="smoke", journal=JOURNAL) as tracker:
            tracker.log_epoch(1, {"train_loss": 1.0})
            tracker.log_epoch(2, {"train_loss": float("nan"), "val_mae": 0.5})
    assert "\n" not in str(err.value)
    assert MlflowClient(sqlite_uri).get_run(tracker.run_id).info.status == "FAILED"
    assert not (env / "runs" / "regression" / "boston-gal-s0").exists()
    with pytest.raises(TrackingError, match=r"'test_mae' is inf in the final metrics"):
        with RunTracker("regression", "boston-gal-s0", CONFIG, profile="smoke", journal=JOURNAL) as tracker:
            tracker.log_final({"test_mae": math.inf})
    assert MlflowClient(sqlite_uri).get_run(tracker.run_id).info.status == "FAILED"
    assert not (env / "runs").joinpath("regression", "boston-gal-s0").exists()


def test_rerun_replaces_record_and_logged_metrics_are_final(env, sqlite_uri):
    first = run_three_epochs()
    run_dir = env / "runs" / "regression" / "boston-gal-s0"
    (run_dir / "stale.txt").write_text("from an older run")
    final = {**FINAL, "val_mae": 0.45}  # same name as an epoch metric: the final value must win
    second = run_three_epochs(final=final)
    assert second.run_id != first.run_id
    assert not (run_dir / "stale.txt").exists()
    assert json.loads((run_dir / "run.json").read_text())["mlflow_run_id"] == second.run_id
    assert [p.name for p in run_dir.parent.iterdir()] == ["boston-gal-s0"]
    assert logged_metrics(second.run_id) == {"train_loss": 0.25, "lr": 0.01, **final}
    assert logged_metrics(first.run_id) == {"train_loss": 0.25, "val_mae": 0.4, "lr": 0.01, **FINAL}
    with pytest.raises(TrackingError, match="no MLflow store at"):  # e.g. a run.json from another machine
        logged_metrics(first.run_id, f"sqlite:///{(env / 'elsewhere').as_posix()}/mlflow.db")
    assert not (env / "elsewhere").exists()  # reading creates nothing
    with pytest.raises(TrackingError, match="cannot read MLflow run"):
        logged_metrics("0" * 32)


def test_options_dictconfig_stage_and_step_name(env, sqlite_uri, monkeypatch):
    monkeypatch.setenv("DVC_STAGE", "toy3d")
    cfg = OmegaConf.create({"lr": 0.1, "run": {"lr": "${lr}", "kwargs": {}}})
    with RunTracker("toy3d", "gd-gal", cfg, profile="smoke", step_name="step", runs_root=Path("out"),
                    variant="eps0.001") as tracker:
        tracker.log_epoch(0, {"z": -1.0})
        tracker.log_epoch(1, {"z": -1.5, "accepted": True})
    run_dir = env / "out" / "toy3d" / "gd-gal"
    assert (run_dir / "history.csv").read_text() == "step,z,accepted\n0,-1.0,\n1,-1.5,1\n"
    assert yaml.safe_load((run_dir / "config.yaml").read_text()) == {"lr": 0.1, "run": {"lr": 0.1, "kwargs": {}}}
    assert json.loads((run_dir / "metrics.json").read_text()) == {}
    run = MlflowClient(sqlite_uri).get_run(tracker.run_id)
    assert run.data.params == {"lr": "0.1", "run.lr": "0.1", "run.kwargs": "{}"}
    assert run.data.tags["dvc_stage"] == "toy3d" and run.data.tags["env_lock_sha256"] == "missing"
    assert run.data.tags["variant"] == "eps0.001"
    record = json.loads((run_dir / "run.json").read_text())
    assert record["stage"] == "toy3d" and record["variant"] == "eps0.001"
    with pytest.raises(TrackingError, match="outside its 'with' block"):
        tracker.log_epoch(2, {"z": -2.0})


def test_default_uri_is_root_sqlite_from_any_cwd(env, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert tracking_uri() == f"sqlite:///{env.resolve().as_posix()}/mlflow.db"
    monkeypatch.setenv("DVC_ROOT", str(env))
    (env / "sub").mkdir()
    monkeypatch.chdir(env / "sub")
    assert tracking_uri() == f"sqlite:///{env.resolve().as_posix()}/mlflow.db"
    check_tracking_server(f"sqlite:///{(env / 'new' / 'dir').as_posix()}/mlflow.db")
    assert (env / "new" / "dir").is_dir()


def make_repo(root: Path):
    """A git checkout at root: train.py, dvc.lock and weights.bin committed, data/ ignored; its git()."""
    def git(*args, **kwargs):
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.org", *args], cwd=root,
                              check=True, capture_output=True, **kwargs).stdout

    git("init", "-q")
    (root / ".gitignore").write_text("/data/\n")
    (root / "train.py").write_text("print(1)\n")
    (root / "dvc.lock").write_text("stages: {}\n")
    (root / "weights.bin").write_bytes(bytes(range(256)))
    git("add", ".")
    git("commit", "-q", "-m", "init")
    return git


def test_a_params_yaml_only_switched_to_a_profile_is_not_a_change(tmp_path):
    from pipelines.profile import switched
    from pipelines.tracking.provenance import git_changes, git_state
    from tests.pipelines.prepare_helpers import ROOT

    git = make_repo(tmp_path)
    committed = (ROOT / "params.yaml").read_text()
    (tmp_path / "params.yaml").write_text(committed)
    git("add", "params.yaml")
    git("commit", "-q", "-m", "params")
    (tmp_path / "params.yaml").write_text(switched(committed, "regression"))  # what `make repro PROFILE=...` does
    assert git_state(tmp_path)[1] is False and git_changes(tmp_path) == (b"", [])
    (tmp_path / "params.yaml").write_text(switched(committed, "regression") + "# edited\n")
    assert git_state(tmp_path)[1] is True and b"+# edited" in git_changes(tmp_path)[0]


def test_sqlite_journals_of_the_store_are_not_a_change(tmp_path):
    """A run that starts while another writes to mlflow.db sees sqlite's journal beside it (the fan-out)."""
    from pipelines.tracking.provenance import git_state

    make_repo(tmp_path)
    for name in ("mlflow.db", "mlflow.db-journal", "mlflow.db-wal", "mlflow.db-shm"):
        (tmp_path / name).write_bytes(b"x")
    assert git_state(tmp_path)[1] is False
    (tmp_path / "other.db-journal").write_bytes(b"x")  # not the store's: an untracked file like any other
    assert git_state(tmp_path)[1] is True


def test_git_commit_and_dirty(env, sqlite_uri):
    git = make_repo(env)
    head = git("rev-parse", "HEAD", text=True).strip()
    (env / "data").mkdir()
    (env / "data" / "ignored.bin").write_bytes(b"x")
    client = MlflowClient(sqlite_uri)
    run_dir = env / "runs/regression/r"

    def run():
        with RunTracker("regression", "r", {"a": 1}, profile="smoke") as tracker:
            pass
        return client.get_run(tracker.run_id), json.loads((run_dir / "run.json").read_text())

    # ignored data/, dvc.lock and the run records it writes itself do not count as changes
    (env / "dvc.lock").write_text("stages: {train: {}}\n")
    run()
    first, record = run()
    assert (first.data.tags["git_commit"], first.data.tags["git_dirty"]) == (head, "false")
    assert (record["git_dirty"], record["git_diff_sha256"], record["git_untracked"]) == (False, None, [])
    assert "git_diff_sha256" not in first.data.tags
    assert "provenance" not in {a.path for a in client.list_artifacts(first.info.run_id)}
    assert first.data.tags["mlflow.source.git.commit"] == head and first.data.tags["mlflow.source.git.branch"]
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml", "history.csv", "metrics.json", "run.json"]

    (env / "train.py").write_text("print(2)\n")
    (env / "weights.bin").write_bytes(bytes(range(255, -1, -1)))  # a binary change
    (env / "new_module.py").write_text("")  # untracked, not ignored: not in the commit either
    dirty, record = run()
    assert dirty.data.tags["git_dirty"] == "true" and record["git_dirty"] is True
    patch = (run_dir / "git_diff.patch").read_bytes()
    assert patch == git("diff", "HEAD", "--binary", "--", ".", ":(exclude)dvc.lock")
    assert b"+print(2)" in patch and b"GIT binary patch" in patch and b"dvc.lock" not in patch
    assert record["git_diff_sha256"] == dirty.data.tags["git_diff_sha256"] == hashlib.sha256(patch).hexdigest()
    assert record["git_untracked"] == ["new_module.py"]
    assert (run_dir / "git_untracked.txt").read_text() == "new_module.py\n"
    copy = env.parent / f"{env.name}-copy"  # the patch puts the tree back onto the commit, binary included
    subprocess.run(["git", "clone", "-q", str(env), str(copy)], check=True)
    subprocess.run(["git", "-C", str(copy), "apply", str(run_dir / "git_diff.patch")], check=True)
    for name in ("train.py", "weights.bin"):
        assert (copy / name).read_bytes() == (env / name).read_bytes()
    artifacts = Path(client.download_artifacts(dirty.info.run_id, "provenance", str(env.parent / "dl")))
    assert (artifacts / "git_diff.patch").read_bytes() == patch
    assert (artifacts / "git_untracked.txt").read_text() == "new_module.py\n"

    git("checkout", "-q", "train.py", "weights.bin")
    only_untracked, record = run()  # dirty through an untracked file alone: an empty patch
    assert only_untracked.data.tags["git_dirty"] == "true" and (run_dir / "git_diff.patch").read_bytes() == b""
    assert record["git_diff_sha256"] == hashlib.sha256(b"").hexdigest()


def test_default_store_keeps_artifacts_at_the_root(env, monkeypatch):
    """The default sqlite store from another cwd: the artifacts lie in <root>/mlartifacts (not ./mlruns),
    and neither they nor mlflow.db make the tree dirty."""
    make_repo(env)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.setenv("DVC_ROOT", str(env))
    (env / "sub").mkdir()
    monkeypatch.chdir(env / "sub")
    (env / "train.py").write_text("print(2)\n")
    with RunTracker("regression", "r", {"a": 1}, profile="smoke", runs_root=env / "runs") as tracker:
        pass
    client = MlflowClient(f"sqlite:///{env.as_posix()}/mlflow.db")
    location = env.resolve() / "mlartifacts" / "regression"
    assert client.get_experiment(tracker.experiment_id).artifact_location == location.as_uri()
    assert (location / tracker.run_id / "artifacts/provenance/git_diff.patch").read_bytes() == \
        (env / "runs/regression/r/git_diff.patch").read_bytes()
    assert not (env / "sub" / "mlruns").exists() and not (env / "mlruns").exists()
    (env / "train.py").write_text("print(1)\n")
    with RunTracker("regression", "r", {"a": 1}, profile="smoke", runs_root=env / "runs") as tracker:
        pass
    assert client.get_run(tracker.run_id).data.tags["git_dirty"] == "false"


# A stage that tracks one run in each store named on its command line (MLFLOW_TRACKING_URI), as pipelines.train does.
STAGE = """
import os, sys
from pipelines.errors import run_cli
from pipelines.tracking.run import RunTracker

def main():
    with RunTracker("regression", "r", {"a": 1}, profile="smoke"):
        pass

codes = []
for uri in sys.argv[1:]:
    os.environ["MLFLOW_TRACKING_URI"] = uri
    codes.append(run_cli("train", main))
sys.exit(max(codes))
"""


def without_root_override() -> list[str]:
    """A command prefix under which file modes bind: root ignores them unless it drops CAP_DAC_OVERRIDE."""
    if os.geteuid() != 0:
        return []
    prefix = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--"]
    if shutil.which("setpriv") is None or subprocess.run([*prefix, "true"], capture_output=True).returncode:
        pytest.skip("running as root without setpriv to drop CAP_DAC_OVERRIDE: chmod would not bind")
    return prefix


def test_unwritable_store_fails_at_once_in_one_line(env, sqlite_uri):
    """A read-only mlflow.db, a read-only directory without one, and a store of a newer MLflow: one line
    each on stderr naming the root cause (not MLflow's tracebacks), in seconds (not 100 s of retries)."""
    run_three_epochs()
    read_only = env / "read_only"
    read_only.mkdir()
    shutil.copy(sqlite_uri[len("sqlite:///"):], read_only / "mlflow.db")  # a real store, with runs
    (read_only / "mlflow.db").chmod(0o444)
    no_store = env / "no_store"
    no_store.mkdir(mode=0o555)
    newer = env / "newer.db"
    with sqlite3.connect(newer) as db:  # migrated by an MLflow that knows a later schema
        db.execute("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)")
        db.execute("INSERT INTO alembic_version VALUES ('ffffffffffff')")
    uris = [f"sqlite:///{p.as_posix()}" for p in (read_only / "mlflow.db", no_store / "mlflow.db", newer)]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_") and "proxy" not in k.lower()}
    start = time.monotonic()
    result = subprocess.run([*without_root_override(), sys.executable, "-c", STAGE, *uris], cwd=env,
                            capture_output=True, text=True, env={**clean, "PYTHONPATH": str(REPO)}, timeout=120)
    assert time.monotonic() - start < 30
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [
        f"train: cannot write to the MLflow store {uris[0]}: sqlite3.OperationalError: attempt to write a readonly "
        "database; make it a writable sqlite file or set MLFLOW_TRACKING_URI",
        f"train: cannot write to the MLflow store {uris[1]}: sqlite3.OperationalError: unable to open database "
        "file; make it a writable sqlite file or set MLFLOW_TRACKING_URI",
        f"train: cannot start an MLflow run in {uris[2]}: alembic.ResolutionError: No such revision or branch "
        "'ffffffffffff'; check MLFLOW_TRACKING_URI and the store"]
    assert not (no_store / "mlflow.db").exists() and not (env / "runs/regression/r").exists()


def test_directory_checksum(tmp_path):
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_bytes(b"a")
    (d / "sub" / "b.txt").write_bytes(b"b")
    first = data_checksum(d)
    assert first.startswith("md5:") and len(first) == 36 and data_checksum(d) == first
    (d / "sub" / "b.txt").rename(d / "b.txt")
    assert data_checksum(d) != first  # names count, not only contents
    with pytest.raises(TrackingError, match="does not exist"):
        data_checksum(tmp_path / "missing.npz")


def test_unreachable_server_fails_fast(env, monkeypatch):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    start = time.monotonic()
    with pytest.raises(TrackingError) as err:
        with RunTracker("regression", "boston-gal-s0", CONFIG, profile="smoke", journal=JOURNAL):
            pytest.fail("the block must not run")
    assert time.monotonic() - start < 5
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"MLflow tracking server at {uri} is unreachable: ")
    assert message.endswith("; start it or unset MLFLOW_TRACKING_URI")
    assert not (env / "runs").exists()


def test_silent_server_times_out(env):
    with socket.socket() as s:  # accepts connections (backlog) but never answers
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        start = time.monotonic()
        with pytest.raises(TrackingError, match="is unreachable: .*timed out"):
            check_tracking_server(f"http://127.0.0.1:{s.getsockname()[1]}", timeout=1)
        assert time.monotonic() - start < 4


def test_run_on_real_server(env, server, monkeypatch, capfd):
    data_file, data = make_inputs(env)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    tracker = run_three_epochs([data_file])
    assert "View run" not in capfd.readouterr().out  # MLflow's banner stays off stdout
    record = json.loads((env / "runs" / "regression" / "boston-gal-s0" / "run.json").read_text())
    assert record["tracking_uri"] == server and record["mlflow_run_id"] == tracker.run_id
    check_mlflow_run(MlflowClient(server), tracker, data)
    make_repo(env)  # now from a dirty tree: the diff goes up as artifacts through the server
    (env / "train.py").write_text("print(2)\n")
    (env / "notes.md").write_text("")
    dirty = run_three_epochs([data_file])
    patch = (env / "runs/regression/boston-gal-s0/git_diff.patch").read_bytes()
    assert b"+print(2)" in patch
    artifacts = Path(MlflowClient(server).download_artifacts(dirty.run_id, "provenance", str(env.parent / "dl")))
    assert sorted(p.name for p in artifacts.iterdir()) == ["git_diff.patch", "git_untracked.txt"]
    assert (artifacts / "git_diff.patch").read_bytes() == patch
    assert (artifacts / "git_untracked.txt").read_text() == "notes.md\n"
    assert MlflowClient(server).get_run(dirty.run_id).info.artifact_uri.startswith("mlflow-artifacts:/")
    assert logged_metrics(tracker.run_id) == {"train_loss": 0.25, "val_mae": 0.4, "lr": 0.01, **FINAL}
    with pytest.raises(RuntimeError, match="boom"):
        with RunTracker("regression", "boston-gal-s1", CONFIG, profile="smoke") as failed:
            raise RuntimeError("boom")
    assert MlflowClient(server).get_run(failed.run_id).info.status == "FAILED"
    assert not (env / "runs" / "regression" / "boston-gal-s1").exists()


# ------------------------------------------------------------------------------------------- resume
def read_record(run_dir: Path) -> dict[str, str]:
    return {name: (run_dir / name).read_text() for name in ("config.yaml", "history.csv", "metrics.json", "run.json")}


def start_and_checkpoint(data_files=(), epochs=2) -> tuple[RunTracker, dict]:
    """A run entered by hand (no __exit__: as if SIGKILLed later) that logged `epochs` epochs; its state."""
    tracker = RunTracker("regression", "boston-gal-s0", CONFIG, profile="smoke", journal=JOURNAL, data_files=data_files)
    tracker.__enter__()
    for epoch, metrics in enumerate(EPOCHS[:epochs], start=1):
        tracker.log_epoch(epoch, metrics)
    return tracker, json.loads(json.dumps(tracker.state()))  # as stored in a checkpoint


def resume_and_finish(state: dict, data_files=(), **kwargs) -> RunTracker:
    with RunTracker("regression", "boston-gal-s0", CONFIG, profile="smoke", journal=JOURNAL, data_files=data_files,
                    resume=state, **kwargs) as tracker:
        for epoch in range(state["last_step"] + 1, len(EPOCHS) + 1):
            tracker.log_epoch(epoch, EPOCHS[epoch - 1])
        tracker.log_final(FINAL)
    return tracker


@pytest.mark.parametrize("error, status", [(RuntimeError, "FAILED"), (KeyboardInterrupt, "KILLED")])
def test_resume_after_exception_matches_uninterrupted_run(env, sqlite_uri, error, status):
    data_file, data = make_inputs(env)
    run_dir = env / "runs" / "regression" / "boston-gal-s0"
    whole = run_three_epochs([data_file])
    expected = read_record(run_dir)
    client = MlflowClient(sqlite_uri)

    with pytest.raises(error):
        with RunTracker("regression", "boston-gal-s0", CONFIG, profile="smoke", journal=JOURNAL, data_files=[data_file]) as first:
            first.log_epoch(1, EPOCHS[0])
            first.log_epoch(2, EPOCHS[1])
            state = first.state()
            raise error("killed")
    assert client.get_run(first.run_id).info.status == status
    assert json.loads(json.dumps(state)) == state and state["last_step"] == 2
    state = json.loads(json.dumps(state))

    resumed = resume_and_finish(state, [data_file])
    assert resumed.run_id == first.run_id == state["mlflow_run_id"] != whole.run_id
    assert resumed.experiment_id == first.experiment_id
    got = read_record(run_dir)
    for name in ("config.yaml", "history.csv", "metrics.json"):
        assert got[name] == expected[name], name
    record, whole_record = json.loads(got["run.json"]), json.loads(expected["run.json"])
    assert record == state["record"] and record["mlflow_run_id"] == first.run_id
    for key in ("mlflow_run_id", "created"):
        del record[key], whole_record[key]
    assert record == whole_record
    check_mlflow_run(client, resumed, data)  # FINISHED, params, each epoch once, final values, tags
    assert logged_metrics(resumed.run_id) == logged_metrics(whole.run_id)
    assert [p.name for p in run_dir.parent.iterdir()] == ["boston-gal-s0"]


def test_resume_after_sigkill_relogs_epochs_past_the_checkpoint(env, sqlite_uri):
    client = MlflowClient(sqlite_uri)
    killed, state = start_and_checkpoint()  # epoch 2 not sent yet: it travels in the state
    killed.log_epoch(3, {"train_loss": 9.0, "val_mae": 9.0})  # after the checkpoint, before the kill
    killed._flush()
    assert client.get_run(killed.run_id).info.status == "RUNNING"
    resumed = resume_and_finish(state)
    run = client.get_run(resumed.run_id)
    assert resumed.run_id == killed.run_id and run.info.status == "FINISHED"
    rows = list(csv.reader((env / "runs/regression/boston-gal-s0/history.csv").read_text().splitlines()))
    assert [r[0] for r in rows] == ["epoch", "1", "2", "3"] and rows[3] == ["3", "0.25", "0.4", ""]
    history = sorted((m.step, m.timestamp, m.value) for m in client.get_metric_history(run.info.run_id, "train_loss"))
    assert [(s, v) for s, _, v in history] == [(1, 1.0), (2, 0.5), (3, 9.0), (3, 0.25)]  # resumed value last
    assert run.data.metrics == {"train_loss": 0.25, "val_mae": 0.4, "lr": 0.01, **FINAL}


def test_resume_sends_metrics_pending_in_the_state(env, sqlite_uri):
    killed, state = start_and_checkpoint()  # killed before epoch 2 reached MLflow
    client = MlflowClient(sqlite_uri)
    assert [m.step for m in client.get_metric_history(killed.run_id, "train_loss")] == [1]
    resumed = resume_and_finish(state)
    history = client.get_metric_history(resumed.run_id, "train_loss")
    assert sorted((m.step, m.value) for m in history) == [(1, 1.0), (2, 0.5), (3, 0.25)]
    assert [(m.step, m.value) for m in client.get_metric_history(resumed.run_id, "lr")] == [(2, 0.01)]


def test_resume_twice_and_state_is_checkpointable(env, sqlite_uri):
    _, state = start_and_checkpoint(epochs=1)
    assert set(state) == {"version", "task", "run_name", "step_name", "variant", "mlflow_run_id",
                          "mlflow_experiment_id", "tracking_uri", "config_sha256", "columns", "history_rows", "final",
                          "last_step", "last_ts", "pending", "record"}
    with RunTracker("regression", "boston-gal-s0", CONFIG, profile="smoke", journal=JOURNAL, resume=state) as tracker:
        tracker.log_epoch(2, EPOCHS[1])
        second = tracker.state()
        second["columns"].clear()  # a copy: the tracker is not affected
        second = tracker.state()
        with pytest.raises(OSError):
            raise OSError("killed again")
    torch = pytest.importorskip("torch")
    path = env / "ckpt.pt"
    torch.save({"epoch": 2, "tracker": second}, path)
    second = torch.load(path, weights_only=True)["tracker"]
    assert second["last_step"] == 2 and second["history_rows"] == 2
    resumed = resume_and_finish(second)
    assert resumed.run_id == tracker.run_id
    assert (env / "runs/regression/boston-gal-s0/history.csv").read_text() == \
        "epoch,train_loss,val_mae,lr\n1,1.0,0.9,\n2,0.5,0.6,0.01\n3,0.25,0.4,\n"


def test_resume_refusals_leave_the_run_alone(env, sqlite_uri, monkeypatch):
    data_file, _ = make_inputs(env)
    with pytest.raises(RuntimeError):
        with RunTracker("regression", "boston-gal-s0", CONFIG, profile="smoke", journal=JOURNAL, data_files=[data_file]) as first:
            first.log_epoch(1, EPOCHS[0])
            state = first.state()
            raise RuntimeError("killed")
    client = MlflowClient(sqlite_uri)

    def refused(match, state=state, config=CONFIG, data_files=(data_file,), run_name="boston-gal-s0",
                profile="smoke", **kwargs):
        with pytest.raises(TrackingError, match=match) as err:
            with RunTracker("regression", run_name, config, profile=profile, journal=JOURNAL, data_files=data_files,
                            resume=state, **kwargs):
                pytest.fail("the block must not run")
        assert "\n" not in str(err.value)
        assert client.get_run(first.run_id).info.status == "FAILED"  # untouched

    delete = "delete the checkpoint to start the run over$"
    refused(f"config differs from the checkpoint's \\(model.lr\\); .*{delete}",
            config={**CONFIG, "model": {**CONFIG["model"], "lr": 0.02}})
    refused("config differs .*past the 500 characters", config={**CONFIG, "long": "x" * 599 + "y"})
    refused("config differs .*new_key", config={**CONFIG, "new_key": 1})
    refused(f"MLflow run 0+ is not in .*; {delete}", state={**state, "mlflow_run_id": "0" * 32})
    refused("from the state of regression/boston-gal-s0", run_name="boston-gal-s1")
    refused("per step\\) from the state of .*\\(per epoch\\)", step_name="step")
    refused(r"\(per epoch, variant 'eps0.001'\) from the state of regression/boston-gal-s0 \(per epoch\); pass the "
            "right checkpoint or", variant="eps0.001")
    refused(f"not one from RunTracker.state\\(\\) .*; {delete}", state={"task": "regression"})
    refused("not one from RunTracker.state", state={**state, "version": 99})
    refused(f"the resume state is damaged; {delete}", state={**state, "pending": [[1]]})
    refused(f"its history journal history.jsonl lacks rows the checkpoint counts; {delete}",
            state={**state, "history_rows": 2})
    refused(f"the git commit changed since the checkpoint, so a resume would mix two versions; .*{delete}",
            state={**state, "record": {**state["record"], "git_commit": "0" * 40}})
    refused("the data checksums changed since", data_files=())
    refused("the profile changed since the checkpoint", profile="full")
    refused(f"the git diff changed since the checkpoint, so a resume would mix two versions; .*{delete}",
            state={**state, "record": {**state["record"], "git_diff_sha256": "0" * 64}})
    refused("its MLflow run is in sqlite:///elsewhere.db, not in sqlite:///.*; set MLFLOW_TRACKING_URI back or",
            state={**state, "tracking_uri": "sqlite:///elsewhere.db"})
    (env / "data/processed/boston.npz").write_bytes(b"new data")
    refused("the data checksums changed since the checkpoint")
    (env / "requirements.lock").write_bytes(b"torch==3\n")
    refused("the data checksums and env lock changed since the checkpoint")

    with pytest.raises(TrackingError, match="outside its 'with' block"):
        first.state()
    with pytest.raises(TrackingError, match="outside its 'with' block"):
        RunTracker("regression", "boston-gal-s0", CONFIG, profile="smoke", journal=JOURNAL).state()


def test_resume_refuses_another_git_diff_and_records_the_start_s(env, sqlite_uri):
    git = make_repo(env)
    (env / "train.py").write_text("print(2)\n")
    killed, state = start_and_checkpoint()
    patch = git("diff", "HEAD", "--binary", "--", ".", ":(exclude)dvc.lock")
    assert state["record"]["git_diff_sha256"] == hashlib.sha256(patch).hexdigest()
    for change in ("print(3)\n", "print(1)\n"):  # another diff, and none (a clean tree)
        (env / "train.py").write_text(change)
        with pytest.raises(TrackingError, match="cannot resume run regression/boston-gal-s0: the git diff changed "
                                                "since the checkpoint, so a resume would mix two versions"):
            resume_and_finish(state)
    (env / "train.py").write_text("print(2)\n")
    (env / "scratch.txt").write_text("")  # an untracked file made meanwhile: not another version of the code
    resumed = resume_and_finish(state)
    run_dir = env / "runs/regression/boston-gal-s0"
    assert resumed.run_id == killed.run_id and (run_dir / "git_diff.patch").read_bytes() == patch
    record = json.loads((run_dir / "run.json").read_text())
    assert record == state["record"] and record["git_untracked"] == [] and record["git_dirty"] is True
    assert (run_dir / "git_untracked.txt").read_text() == ""  # as at the start


def test_resume_on_real_server(env, server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    killed, state = start_and_checkpoint()
    resumed = resume_and_finish(state)
    run = MlflowClient(server).get_run(resumed.run_id)
    assert resumed.run_id == killed.run_id and run.info.status == "FINISHED"
    assert logged_metrics(resumed.run_id) == {"train_loss": 0.25, "val_mae": 0.4, "lr": 0.01, **FINAL}
    assert (env / "runs/regression/boston-gal-s0/history.csv").read_text() == \
        "epoch,train_loss,val_mae,lr\n1,1.0,0.9,\n2,0.5,0.6,0.01\n3,0.25,0.4,\n"
