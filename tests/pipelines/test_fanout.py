"""`make fanout` (pipelines/fanout.py): four smoke training stages fanned out at once, two rounds in a row
with real DVC and MLflow (sqlite, as on one node), their runs started warm as `make fanout` starts them;
dvc.lock stays complete, `dvc status` clean, every run recorded once, and a finished round is not run again."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipelines.fanout import Devices, gpus_needed, plan
from tests.workspace import ROOT, copy_project

BIN = Path(sys.executable).parent
ROUNDS = {d: [f"train_regression@{d}-{m}-{s}" for m in ("baseline", "gal") for s in (0, 1)]
          for d in ("boston", "diabetes")}  # the second round adds to a lock the first wrote


@pytest.fixture
def repo(tmp_path):
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "GAL_LAUNCHER": "local"}
    for name in ("MLFLOW_TRACKING_URI", "GAL_DATA_MIRROR", "DVC_STAGE", "CUDA_VISIBLE_DEVICES"):
        env.pop(name, None)
    return copy_project(tmp_path), env


def fanout(repo: Path, env: dict, *args: str) -> str:
    """`make fanout`'s command: the fan-out under a warm server of its own."""
    done = subprocess.run([BIN / "python", "-m", "pipelines.warm", BIN / "python", "-m", "pipelines.fanout", *args],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "starts cold" not in done.stderr, done.stderr  # every run was served
    return done.stdout


@pytest.mark.slow
def test_two_rounds_of_four_stages_at_once_leave_a_complete_lock_and_one_run_each(repo):
    repo, env = repo
    for stages in ROUNDS.values():
        out = fanout(repo, env, "--jobs", "4", *stages)
        assert "4 of 4 training stages to run, 4 at a time" in out
        # all four started before the first finished: they ran side by side
        events = re.findall(r"^(start|done) (\S+)", out, re.MULTILINE)
        assert [kind for kind, _ in events[:4]] == ["start"] * 4 and {name for _, name in events} == set(stages), out
    everything = [s for stages in ROUNDS.values() for s in stages]
    again = fanout(repo, env, "--jobs", "4", *everything)
    assert "0 of 8 training stages to run" in again and "start" not in again

    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    for stage in everything:
        outs = lock[stage]["outs"]
        assert {Path(o["path"]).name for o in outs} == {"config.yaml", "run.json", "metrics.json", "history.csv"}
        assert all(o["md5"] and (repo / o["path"]).exists() for o in outs), stage
    for launcher in ("local", "slurm"):  # the launcher is no part of a stage: switching it reruns nothing
        status = subprocess.run([BIN / "dvc", "status", *everything], cwd=repo, env={**env, "GAL_LAUNCHER": launcher},
                                capture_output=True, text=True)
        assert status.returncode == 0 and "up to date" in status.stdout, status.stdout
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("regression").experiment_id])
    names = sorted(r.info.run_name for r in runs)
    expected = sorted(re.sub(r"train_regression@(\w+)-(\w+)-(\d)", r"\1-\2-s\3", s) for s in everything)
    assert names == expected and {r.info.status for r in runs} == {"FINISHED"}


def test_bad_targets_and_settings_fail_in_one_line(repo):
    repo, env = repo
    for args, message in ((["no_such_stage"], "no stage"), (["--jobs", "0"], "--jobs=0: use at least 1")):
        done = subprocess.run([BIN / "python", "-m", "pipelines.fanout", *args], cwd=repo, env=env,
                              capture_output=True, text=True)
        assert done.returncode == 2 and done.stderr.count("\n") == 1 and message in done.stderr, done.stderr


def test_each_run_takes_its_own_gpus_and_cpu_runs_take_none(monkeypatch):
    monkeypatch.chdir(ROOT)
    upstream, training = plan(["train_regression@boston-gal-0", "train_cifar@cifar10-sgd-gal-0", "report"])
    assert {"prepare@boston", "prepare_cifar@cifar10"} <= set(upstream) and "report" not in upstream
    assert {"train_regression@boston-gal-0", "train_cifar@cifar10-sgd-gal-0"} < {name for name, _ in training}
    paper = "python -m pipelines.train profile=paper experiment="
    assert gpus_needed(paper + "boston_gal trainer.gpus=1") == 0  # the regression presets run on the CPU
    assert gpus_needed(paper + "cifar100_sgd_gal trainer.gpus=4") == 4
    assert gpus_needed(paper + "imagenet_resnet50_gal trainer.gpus=4 trainer.nodes=2") == 8
    devices, held, peak = Devices(["0", "1", "2", "3"]), [], [0]
    lock = threading.Lock()

    def run(n: int) -> None:
        ids = devices.take(n)
        with lock:
            held.append(set(ids))
            assert not set.intersection(*held) if len(held) > 1 else True  # no GPU given to two runs at once
            peak[0] = max(peak[0], sum(map(len, held)))
        time.sleep(0.05)
        with lock:
            held.remove(set(ids))
        devices.give(ids)

    with ThreadPoolExecutor(6) as pool:
        list(pool.map(run, [2, 3, 1, 2, 4, 1, 2, 3]))
    assert peak[0] <= 4 and sorted(devices.free) == ["0", "1", "2", "3"]
