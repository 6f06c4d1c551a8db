"""python -m pipelines.report when runs are absent or inconsistent: specs whose runs are missing are skipped
with a note naming the runs and the dvc stage that makes them (regression, classification, the ablations), no
runs at all fails, and mixed or unexpected profiles are refused in one line, keeping the old reports. An
unusable --out is one line before any work, and what a killed report left behind goes on the next run."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines.atomic import _host
from pipelines.report import __main__ as report_cli
from pipelines.report.model import Context, Rendered
from pipelines.report.records import MissingRuns
from tests.pipelines.report_fixtures import ABL_SEEDS, CLS_SEEDS, make_runs, read_csv
from tests.pipelines.test_tracking import without_root_override

REPO = Path(__file__).resolve().parents[2]


def test_missing_runs_skip_only_their_spec(tmp_path, monkeypatch, capsys):
    """Table V and Fig. 4 lack runs: both are skipped with a note (and their old outputs removed), the rest is
    rendered, and the claims and provenance simply lack them."""
    monkeypatch.chdir(tmp_path)
    make_runs(Path("runs"), skip=("boston-gal-s3", "california-baseline-s0", "adam-gal"))
    for stale in ("tables/table5.md", "figures/fig4_toy3d.png"):
        Path("reports", stale).parent.mkdir(parents=True, exist_ok=True)
        Path("reports", stale).write_text("previous\n")
    assert report_cli.main(["--runs", "runs", "--out", "reports"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1:] == [
        "report: skipped Table V: missing runs under runs/regression: boston/gal seed=3 (data.name=boston); "
        "california/baseline seed=0 (data.name=california); make them with `dvc repro train_regression`",
        *(f"report: skipped {name}: missing runs under runs/regression: Boston ours/gal seed=3 (data.name=boston); "
          "make them with `dvc repro train_regression`" for name in ("Protocol study", "Protocol curves")),
        "report: skipped Table V at d = 1: 14 GAL run(s) predate h's statistics (e.g. runs/regression/boston-gal-s0); "
        "make them with `dvc repro train_regression`",  # these records have no adjuster_grad_norm column
        "report: skipped Fig. 4: missing runs under runs/toy3d: adam/gal seed=0 (optimizer=adam); make them with "
        "`dvc repro toy3d`",
        "report: skipped Precision study: no runs under runs/precision; make them with `dvc repro precision`"]
    index_md = Path("reports/index.md").read_text()
    assert ("**Not rendered, their runs are missing: Table V, Protocol study, Protocol curves, Table V at d = 1, Fig. 4, "
            "Precision study.**") in index_md
    note = index_md.split("## Table V\n")[1].split("\n## ")[0]
    assert "Skipped: its runs are missing" in note and "data.name in {boston, diabetes, california} x " \
        "method.name in {baseline, gal}" in note and "boston/gal seed=3" in note
    assert "Make them with `dvc repro train_regression`, then rerun `python -m pipelines.report`" in note
    assert "adam/gal seed=0" in index_md.split("## Fig. 4\n")[1] and "## Table VII" in index_md
    assert not list(Path("reports").glob("*/table5.*")) and not list(Path("reports").glob("*/fig4_toy3d.*"))
    assert Path("reports/tables/table7.md").is_file() and Path("reports/figures/fig5_val_loss.png").is_file()
    tables = {r["table"] for r in read_csv(Path("reports/tables/claims.csv"))}
    assert "Table V" not in tables and "Table I" in tables
    prov = json.loads(Path("reports/provenance.json").read_text())
    assert not [k for k in prov["numbers"] if k.startswith(("Table V/", "Fig. 4/"))]
    assert "Table V" not in prov["profiles"] and "Table VII" in prov["profiles"]


def test_no_runs_at_all(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert report_cli.main(["--runs", "runs", "--out", "reports"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("report: no table or figure has its runs under runs/ (first: Table I: no runs under "
                          "runs/classification with experiment in {cifar10_sgd, cifar10_lookahead, cifar10_adabound} "
                          "x method.name in {baseline, gal}); make them first (dvc repro)")
    assert not Path("reports").exists()


def _snapshot(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}


def test_mixed_profiles_fail_in_one_line_and_keep_old_reports(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    make_runs(Path("runs"), profiles={"diabetes-gal-s1": "regression"})
    (Path("reports") / "tables").mkdir(parents=True)
    Path("reports/tables/table5.md").write_text("previous\n")
    before = _snapshot(Path("reports"))
    assert report_cli.main([]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("report: Table V: runs come from mixed profiles") and "runs/regression/diabetes-gal-s1" in err
    assert _snapshot(Path("reports")) == before
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left


def test_asked_profile_must_match(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    make_runs(Path("runs"))
    assert report_cli.main(["profile=regression"]) == 2
    assert "profile 'smoke' but profile=regression" in capsys.readouterr().err


def test_missing_classification_runs_are_named(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    make_runs(Path("runs"), skip=("cifar100_adabound-gal-s1", "imagenet_resnet50-gal-s2"))
    assert report_cli.main([]) == 0
    out = capsys.readouterr().out
    assert "report: skipped Table II: missing runs under runs/classification: cifar100_adabound/gal seed=1 " \
           "(experiment=cifar100_adabound); make them with `dvc repro train_cifar`" in out
    assert "report: skipped Table VII: missing runs under runs/classification: ImageNet/gal seed=2 " \
           "(experiment=imagenet_resnet50); make them with `dvc repro train_imagenet`" in out
    skipped = [line.removeprefix("report: skipped ").split(":")[0] for line in out.splitlines()[1:]]
    assert skipped == ["Table II", "Table III", "Table V at d = 1", "Table VII", "Fig. 5",  # Figs. 6, 8b: GAL runs
                       "Precision study"]  # only, 2 seeds; Table V at d = 1, Precision study: no such records here
    assert Path("reports/tables/table1.md").is_file() and Path("reports/figures/fig4_toy3d.png").is_file()


def test_missing_ablation_runs_are_named(tmp_path, monkeypatch, capsys):
    """Without the SGD preset's GAL runs the ablations are skipped, naming the stage that makes them; a Fig. 7
    panel with no value but the preset's names its own stage; an ablation without runs is left out of its table."""
    monkeypatch.chdir(tmp_path)
    made = make_runs(Path("runs"), skip=tuple(f"cifar100_sgd-gal-s{s}" for s in CLS_SEEDS)
                     + tuple(f"cifar100_lookahead-gal-scale0.5-s{s}" for s in ABL_SEEDS))
    assert report_cli.main([]) == 0
    out = capsys.readouterr().out
    for name, setting in (("Table VI", "Learned h/gal: no runs (experiment=cifar100_sgd, method.source=learned)"),
                          ("Table VIII", "MLP 256-64-32/gal: no runs (experiment=cifar100_sgd, method.kind=mlp, "
                                         "method.arch=[256, 64, 32])"),
                          ("Fig. 8a", "Line 7 (<=)/gal: no runs (experiment=cifar100_sgd, method.policy=safeguard)")):
        assert f"report: skipped {name}: missing runs under runs/classification: {setting}; make them with " \
               "`dvc repro train_cifar`" in out
    assert "report: skipped Fig. 7: missing runs under runs/classification: SGD preset/gal: no runs " \
           "(experiment=cifar100_sgd); Lookahead/s: no value but the preset's (variants scale<x>); make them with " \
           "`dvc repro train_cifar ablate_scale`" in out
    skipped = [line.removeprefix("report: skipped ").split(":")[0] for line in out.splitlines()[1:]]
    assert skipped == ["Table II", "Table V at d = 1", "Table VI", "Table VII", "Table VIII", "Fig. 5",
                       "Precision study", "Fig. 7", "Fig. 8a", "Fig. 8b"]  # d = 1, precision: no such records here
    note = Path("reports/index.md").read_text().split("## Table VI\n")[1].split("\n## ")[0]
    assert "Skipped: its runs are missing" in note and "Make them with `dvc repro train_cifar`" in note

    for name, path in made.items():  # the presets back; no normalised normal noise: its row is left out
        if "src-normal" in name and "norm-false" not in name:
            shutil.rmtree(path)
    make_runs(Path("more"))
    for seed in CLS_SEEDS:
        shutil.copytree(Path(f"more/classification/cifar100_sgd-gal-s{seed}"),
                        Path(f"runs/classification/cifar100_sgd-gal-s{seed}"))
    rendered = table6_render(Path("runs"))
    assert [row[:2] for row in rendered.layout.rows] == [["none (the baseline)", "-"], ["learned h (GAL)", "yes"],
                                                         ["uniform noise", "yes"], ["uniform noise", "no"],
                                                         ["normal noise", "no"]]
    assert rendered.layout.notes[-1] == ("left out, no runs yet: normal noise, normalised (variant src-normal; "
                                         "`dvc repro ablate_noise`)")
    assert not [c for c in rendered.claims if "normal noise" in c.statement and "unnormalised" not in c.statement]
    for name, path in made.items():  # no noise at all: nothing to show
        if "src-" in name and path.exists():
            shutil.rmtree(path)
    with pytest.raises(MissingRuns, match=r"Table VI: no runs under runs/classification of EfficientNet-B1 on "
                                          r"CIFAR-100 \(SGD\) with noise in place of h .*make them with `dvc repro "
                                          r"ablate_noise ablate_raw_noise`"):
        table6_render(Path("runs"))


def table6_render(runs: Path) -> Rendered:
    from pipelines.report.specs import table6

    return table6.SPEC.render(Context(runs_root=runs, out=runs.parent / "out"))


def _tree(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root``: a file's bytes, None for a directory."""
    return {p.relative_to(root).as_posix(): p.read_bytes() if p.is_file() else None for p in root.rglob("*")}


@pytest.mark.parametrize("out, message", [
    pytest.param("README.md", "output directory README.md is a file; name a directory with --out (default: "
                 "reports)", id="a-file"),
    pytest.param("README.md/reports", "output directory README.md/reports lies below the file README.md; name a "
                 "directory with --out (default: reports)", id="below-a-file"),
    pytest.param("reports", "output directory reports: reports/index.md is a directory where the report writes a "
                 "file; move it away", id="index-a-folder"),
])
def test_an_unusable_out_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys, out, message):
    monkeypatch.chdir(tmp_path)
    make_runs(Path("runs"))
    Path("README.md").write_text("# the project\n")
    Path("reports/index.md").mkdir(parents=True)  # a folder where the report writes its index
    before = _tree(tmp_path)
    assert report_cli.main(["--out", out]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"report: {message}\n" and captured.out == ""
    assert _tree(tmp_path) == before  # README.md untouched, no temp dir, no reports


def test_an_unwritable_out_is_one_line(tmp_path):
    """A new --out in a read-only folder, and a read-only --out itself: the stage command's one line, exit 2."""
    make_runs(tmp_path / "runs")
    (tmp_path / "open/reports").mkdir(parents=True)
    (tmp_path / "open/reports/index.md").write_text("previous\n")
    (tmp_path / "locked").mkdir()
    locked = (tmp_path / "open/reports", tmp_path / "locked")
    for path in locked:
        path.chmod(0o555)
    try:
        before = _tree(tmp_path)
        for out, place in (("locked/new", "locked"), ("open/reports", "open/reports")):
            done = subprocess.run([*without_root_override(), sys.executable, "-m", "pipelines.report", "--out", out],
                                  cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                                  text=True, timeout=120)
            assert done.returncode == 2 and done.stdout == "", done.stderr
            assert done.stderr == (f"report: output directory {out}: cannot write in {place}; name a writable "
                                   "directory with --out or fix its permissions\n")
        assert _tree(tmp_path) == before
    finally:
        for path in locked:
            path.chmod(0o755)


def test_a_killed_reports_work_folders_go_on_the_next_run_and_git_ignores_them(tmp_path, monkeypatch):
    """SIGKILL mid-build leaves .reports.tmp-<host>-<pid>-* beside reports/ (and a report killed while replacing
    its folders a .tables.old-* in it): git status does not list them under the project's .gitignore, and the
    next report removes them; another live process's work folder stays."""
    monkeypatch.chdir(tmp_path)
    make_runs(Path("runs"))
    subprocess.run(["git", "init", "-q"], check=True)
    shutil.copy(REPO / ".gitignore", ".gitignore")
    killed = subprocess.Popen([sys.executable, "-m", "pipelines.report"], env={**os.environ, "PYTHONPATH": str(REPO)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(Path(".").glob(".reports.tmp-*")):
        assert killed.poll() is None and time.monotonic() < deadline, "the report ended before it was killed"
        time.sleep(0.005)
    killed.send_signal(signal.SIGKILL)  # rendering into its work folder
    killed.wait()
    (work,) = Path(".").glob(".reports.tmp-*")
    assert work.name.startswith(f".reports.tmp-{_host()}-{killed.pid}-")  # as pipelines.atomic names them
    old = Path(f"reports/.tables.old-{_host()}-{killed.pid}-abc")
    (old / "content").mkdir(parents=True)  # as replace_dir moves the old tables/ aside
    (old / "content/table5.md").write_text("previous\n")
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        other = Path(f".reports.tmp-{_host()}-{live.pid}-abcd1234")
        other.mkdir()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], capture_output=True,
                                text=True, check=True).stdout
        assert status and ".tmp-" not in status and ".old-" not in status, status
        assert report_cli.main([]) == 0
        assert not work.exists() and not old.exists() and other.is_dir()
    finally:
        live.kill()
        live.wait()
