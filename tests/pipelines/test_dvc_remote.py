"""Prepared data shared between machines (docs/team-server.md), with real DVC: pushed once
to a DVC remote (a local directory here) and pulled by another clone, or read from a DVC cache that clones
share on a cluster file system; either way the other clone reproduces a training stage without preparing."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.workspace import copy_project

BIN = Path(sys.executable).parent
TRAIN = "train_regression@boston-gal-0"


def run(cwd: Path, env: dict, *cmd: str) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout


@pytest.fixture
def prepared(tmp_path):
    """A clone that prepared Boston and committed its dvc.lock; the environment to run DVC in."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    for name in ("MLFLOW_TRACKING_URI", "GAL_DATA_MIRROR", "DVC_STAGE", "GAL_LAUNCHER"):
        env.pop(name, None)
    origin = copy_project(tmp_path / "origin")
    run(origin, env, "dvc", "repro", "prepare@boston")
    return origin, env


def clone(origin: Path, dest: Path, env: dict) -> Path:
    """A git clone of ``origin`` after committing its dvc.lock and DVC config, as a team shares them."""
    run(origin, env, "git", "add", "dvc.lock", ".dvc/config")
    run(origin, env, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "prepared")
    run(origin.parent, env, "git", "clone", "-q", str(origin), str(dest))
    return dest


def reproduce_without_preparing(repo: Path, env: dict, *flags: str) -> None:
    out = run(repo, env, "dvc", "repro", *flags, TRAIN)
    assert "Running stage 'prepare@boston'" not in out and f"Running stage '{TRAIN}'" in out, out
    assert (repo / "runs/regression/boston-gal-s0/metrics.json").exists()


def test_a_second_clone_pulls_prepared_data_from_a_remote(prepared, tmp_path):
    origin, env = prepared
    run(origin, env, "dvc", "remote", "add", "-d", "shared", str(tmp_path / "remote"))
    pushed = run(origin, env, "dvc", "push", "prepare@boston")
    assert "pushed" in pushed and any((tmp_path / "remote").rglob("*"))
    other = clone(origin, tmp_path / "other", env)
    assert not (other / "data/processed/boston.npz").exists()
    reproduce_without_preparing(other, env, "--pull")
    assert (other / "data/processed/boston.npz").read_bytes() == (origin / "data/processed/boston.npz").read_bytes()


def test_clones_sharing_a_dvc_cache_reuse_prepared_data(prepared, tmp_path):
    origin, env = prepared
    shared = tmp_path / "shared-cache"
    (origin / ".dvc/cache").rename(shared)  # as if it had been on the shared file system from the start
    run(origin, env, "dvc", "cache", "dir", str(shared))
    run(origin, env, "dvc", "config", "cache.shared", "group")  # files the whole group may read and add to
    other = clone(origin, tmp_path / "other", env)
    run(other, env, "dvc", "checkout", "prepare@boston")  # links (or copies) from the shared cache: no download
    reproduce_without_preparing(other, env)
