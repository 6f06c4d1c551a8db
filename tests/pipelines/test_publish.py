"""pipelines.publish (`make publish`) on a tiny checkout: the report's synthetic regression runs
(report_fixtures.make_runs), a params.yaml the command switches, and a command that renders the report in
place of `make repro`; then pipelines.audit --published on the copy, without the runs or MLflow. The refusals
(a dirty checkout, a failed command, a report of another profile) are one line and write nothing; a failure
while copying leaves the previous copy as it was."""
from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import psutil
import pytest
import torch

from pipelines import audit, publish
from tests.pipelines.report_fixtures import make_runs

PARAMS = ("profile: regression\nablations: *smoke_grid\nprotocols: *smoke_protocol\nseeds: *smoke_seeds\n"
          "beyond: *smoke_beyond\n")
PY = sys.executable


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.org", *args], cwd=root,
                          check=True, capture_output=True, text=True).stdout


def checkout(root: Path, runs: bool = True) -> str:
    """A committed checkout at ``root`` (its params.yaml at profile regression) with the regression runs of the
    report's fixtures (smoke profile) and a run no table uses; its commit."""
    root.mkdir(parents=True, exist_ok=True)
    git(root, "init", "-q")
    (root / ".gitignore").write_text("/runs/\n/reports/\n/mlflow.db\n")
    (root / "params.yaml").write_text(PARAMS)
    (root / "train.py").write_text("lr = 0.1\n")
    git(root, "add", ".")
    git(root, "commit", "-q", "-m", "init")
    if runs:
        made = make_runs(root / "runs")
        for task in ("toy3d", "classification", "detection"):  # Table V, its studies and Beyond the paper are enough
            shutil.rmtree(root / "runs" / task)
        unused = root / "runs/other/x-s0"
        shutil.copytree(made["boston-gal-s0"], unused)
    return git(root, "rev-parse", "HEAD").strip()


def command(profile: str = "smoke", then: str = "") -> list[str]:
    """What stands for `make repro PROFILE=<profile>`: switch params.yaml, render the report."""
    return ["sh", "-c", f"{PY} -m pipelines.profile {profile} && {PY} -m pipelines.report --runs runs --out reports "
                        f">/dev/null{then}"]


def run_publish(root: Path, profile: str, cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "pipelines.publish", profile, "--", *cmd], cwd=root, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> dict:
    """A checkout published once (profile smoke)."""
    root = tmp_path_factory.mktemp("checkout")
    commit = checkout(root)
    (root / "reports").mkdir()
    (root / "reports/preflight.csv").write_text("stage,hours\n")  # `make preflight`'s, not the report's
    with open(root / "runs/regression/boston-gal-s0/config.yaml", "a") as f:
        f.write(f"root: {root}\n")  # a real run's config names its checkout
    done = run_publish(root, "smoke", command())
    return {"root": root, "commit": commit, "done": done, "copy": root / "results/smoke"}


def test_publish_copies_the_report_and_the_runs_it_used_with_a_stamp(published):
    root, copy, done = published["root"], published["copy"], published["done"]
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == ("publish: results/smoke/ holds the smoke report, its run records and "
                                            "stamp.json; commit it (git add results/smoke)")
    assert (root / "params.yaml").read_text() == PARAMS  # switched by the command, put back after it
    assert git(root, "status", "--porcelain") == "?? results/\n"
    assert sorted(p.name for p in (root / "results").iterdir()) == ["smoke"]  # no work folder left

    stamp = json.loads((copy / "stamp.json").read_text())
    files = {p.relative_to(copy).as_posix() for p in copy.rglob("*") if p.is_file()}
    assert files == set(stamp["files"]) | {"stamp.json"}
    for rel, sha in stamp["files"].items():
        assert hashlib.sha256((copy / rel).read_bytes()).hexdigest() == sha, rel
    assert {"index.md", "provenance.json", "tables/table5.md", "tables/table5.csv", "tables/claims.md",
            "figures/protocol_curves.png", "preflight.csv"} <= files
    prov = json.loads((copy / "provenance.json").read_text())
    used = {run["dir"] for entry in prov["numbers"].values() for run in entry["runs"]}
    runs = {str(Path(rel).parent) for rel in files if rel.startswith("runs/")}
    assert runs == used | {r["baseline"] for r in prov["runs"].values() if r["baseline"]}
    assert "runs/regression/boston-gal-s0" in runs and not any(r.startswith("runs/other") for r in runs)
    assert {Path(rel).name for rel in files if rel.startswith("runs/regression/boston-gal-s0/")} == \
        {"config.yaml", "history.csv", "metrics.json", "run.json"}
    assert "root: <checkout>\n" in (copy / "runs/regression/boston-gal-s0/config.yaml").read_text()
    assert not [rel for rel in files if str(root).encode() in (copy / rel).read_bytes()]  # nowhere in the copy

    assert stamp["commit"] == published["commit"] and stamp["profile"] == "smoke" and stamp["runs"] == len(runs)
    assert stamp["command"].startswith("python -m pipelines.publish smoke -- sh -c ")
    assert datetime.fromisoformat(stamp["published_utc"]).utcoffset().total_seconds() == 0
    machine = stamp["machine"]
    assert machine["cpu"] and machine["cores"] >= 1 and isinstance(machine["gpus"], list)
    assert machine["torch"] == torch.__version__


def test_audit_answers_from_the_published_copy_alone(published, tmp_path, monkeypatch, capsys):
    """Elsewhere, with no runs, no reports and an MLflow store that cannot answer: the copy is enough."""
    shutil.copytree(published["copy"], tmp_path / "results/smoke")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # would fail if it were asked
    assert audit.main(["--published", "smoke", "Table V", "Boston", "GAL", "MAE"]) == 0
    out = capsys.readouterr().out
    assert "  source: the published copy results/smoke/, not MLflow\n" in out
    assert f"  published: commit {published['commit']}, " in out and "by `python -m pipelines.publish smoke -- " in out
    assert "  results/smoke/runs/regression/boston-gal-s0\n" in out and "test_mae: run record 2.65" in out
    assert "config diff from baseline results/smoke/runs/regression/boston-baseline-s0" in out
    assert out.splitlines()[-1].startswith(f"Published copy check: OK (5 runs' records and provenance.json as "
                                           f"published at commit {published['commit'][:12]}; mean recomputed")

    assert audit.main(["Table V"]) == 2  # no reports here: the one line points at the copy
    assert capsys.readouterr().err.endswith("or audit a published copy: --published results/smoke\n")
    assert audit.main(["--published", "paper", "Table V"]) == 2
    assert capsys.readouterr().err == ("audit: no published copy at paper (no paper/stamp.json); choose one of: "
                                       "results/smoke\n")
    with pytest.raises(SystemExit) as exit_:
        audit.main(["--published", "smoke", "--tracking-uri", "sqlite:///x.db", "Table V"])
    assert exit_.value.code == 2


def test_an_edited_published_file_is_a_mismatch(published, tmp_path, monkeypatch, capsys):
    shutil.copytree(published["copy"], tmp_path / "results/smoke")
    monkeypatch.chdir(tmp_path)
    metrics = tmp_path / "results/smoke/runs/regression/boston-gal-s0/metrics.json"
    metrics.write_text(metrics.read_text().replace("2.65", "2.6"))
    (tmp_path / "results/smoke/runs/regression/boston-gal-s1/history.csv").unlink()
    base = tmp_path / "results/smoke/runs/regression/boston-baseline-s2/config.yaml"  # read for the config diff
    base.write_text(base.read_text() + "lr: 1\n")
    assert audit.main(["--published", "results/smoke", "Table V/Boston/GAL/MAE/mean"]) == 1
    out = capsys.readouterr().out
    assert "Published copy check: MISMATCH (4 problems)" in out
    assert "  - results/smoke/runs/regression/boston-baseline-s2/config.yaml was edited after publishing" in out
    assert ("  - results/smoke/runs/regression/boston-gal-s0/metrics.json was edited after publishing (sha256 "
            "differs from stamp.json)\n") in out
    assert "  - results/smoke/runs/regression/boston-gal-s1/history.csv is missing from the published copy\n" in out
    assert "  - incomplete run record results/smoke/runs/regression/boston-gal-s1: no history.csv\n" in out


def test_a_dirty_checkout_is_refused_in_one_line_before_anything_runs(tmp_path):
    checkout(tmp_path, runs=False)
    (tmp_path / "train.py").write_text("lr = 0.2\n")
    (tmp_path / "notes.md").write_text("")
    done = run_publish(tmp_path, "smoke", ["touch", "ran"])
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == ("publish: the checkout has uncommitted changes (train.py, notes.md): commit them (or stash "
                           "them) and publish again; a published result is made by one commit\n")
    assert not (tmp_path / "ran").exists() and not (tmp_path / "results").exists()
    assert (tmp_path / "params.yaml").read_text() == PARAMS


def test_a_failed_run_publishes_nothing_and_puts_params_back(tmp_path):
    checkout(tmp_path)
    done = run_publish(tmp_path, "smoke", command(then="; exit 3"))
    assert done.returncode == 3, done.stderr
    assert done.stderr.splitlines()[-1].endswith("failed (exit code 3); nothing published")
    assert (tmp_path / "params.yaml").read_text() == PARAMS and git(tmp_path, "status", "--porcelain") == ""
    assert not (tmp_path / "results").exists()


def test_a_signal_to_publish_ends_the_whole_command_and_puts_params_back(tmp_path):
    """make passes no signal on to its recipe's processes: publish signals the command's whole process group."""
    checkout(tmp_path, runs=False)
    grandchild = tmp_path / "grandchild.pid"  # a process under the command, as a run is under make and DVC
    proc = subprocess.Popen([PY, "-m", "pipelines.publish", "smoke", "--", "sh", "-c",
                             f"{PY} -m pipelines.profile regression && (sleep 600 & echo $! > {grandchild}; wait)"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not grandchild.exists() or not grandchild.read_text().strip():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and err.splitlines()[-1] == "publish: interrupted by SIGTERM; nothing published; " \
        "params.yaml put back", err
    assert not psutil.pid_exists(int(grandchild.read_text())) or \
        psutil.Process(int(grandchild.read_text())).status() == psutil.STATUS_ZOMBIE
    assert (tmp_path / "params.yaml").read_text() == PARAMS and not (tmp_path / "results").exists()


def test_a_report_of_another_profile_is_refused(tmp_path):
    """The command made the smoke report, but regression was asked for: nothing published, params put back."""
    checkout(tmp_path)
    done = run_publish(tmp_path, "regression", command("smoke"))
    assert done.returncode == 2 and done.stderr.count("\n") == 2, done.stderr  # params put back, then the refusal
    assert done.stderr.endswith("is of profile smoke, not regression (5 of 5 tables and figures); make repro "
                                "PROFILE=regression remakes them\n")
    assert not (tmp_path / "results").exists() and git(tmp_path, "status", "--porcelain") == ""


def test_tables_a_profile_runs_at_smoke_size_are_published_with_it(tmp_path):
    """The regression profile runs the image stages at smoke size (conf/data_profile/*_regression.yaml): its
    report is published with those tables smoke and Table V at regression."""
    root = tmp_path / "checkout"
    checkout(root, runs=False)
    names = make_runs(tmp_path / "names")
    image_runs = {name: "smoke" for name, made in names.items() if made.parent.name == "classification"}
    make_runs(root / "runs", "regression", profiles=image_runs)
    for task in ("toy3d", "detection"):
        shutil.rmtree(root / "runs" / task)
    done = run_publish(root, "regression", command("regression"))
    assert done.returncode == 0, done.stderr
    profiles = json.loads((root / "results/regression/provenance.json").read_text())["profiles"]
    assert profiles["Table V"] == "regression" and profiles["Table I"] == profiles["Table VIII"] == "smoke"


def test_a_failure_while_copying_leaves_the_previous_copy(tmp_path, monkeypatch):
    """The copy is built beside results/<profile> and renamed into place: a failure keeps the old one whole."""
    checkout(tmp_path)
    monkeypatch.chdir(tmp_path)
    dest = tmp_path / "results/smoke"

    def publish_smoke() -> Path:
        return publish.publish("smoke", command(), tmp_path, tmp_path / "reports", dest, "test")

    publish_smoke()
    git(tmp_path, "add", "results")
    git(tmp_path, "commit", "-q", "-m", "publish")
    before = {p: p.read_bytes() for p in dest.rglob("*") if p.is_file()}

    def broken() -> dict:
        raise OSError("disk full")

    monkeypatch.setattr(publish, "describe", broken)
    with pytest.raises(OSError, match="disk full"):
        publish_smoke()
    assert {p: p.read_bytes() for p in dest.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in dest.parent.iterdir()) == ["smoke"]
    assert git(tmp_path, "status", "--porcelain") == ""
