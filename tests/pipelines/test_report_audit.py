"""The audit (python -m pipelines.audit) on the report's synthetic site: tracing a number to its runs, config
diffs and dvc stages, and cross-checking it against a tmp MLflow sqlite store (mismatches, stale reports,
unknown names)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipelines import audit
from tests.pipelines.report_fixtures import SEEDS, SPEC_NAMES, abl_values, cls_best, value, values_of


@pytest.fixture
def at_site(site, monkeypatch):
    """Run from the site's directory, reading each run's MLflow store from its run.json."""
    monkeypatch.chdir(site["root"])
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return site


def test_audit_traces_a_number_and_mlflow_agrees(at_site, capsys):
    site = at_site
    assert audit.main(["table v", "BOSTON", "gal", "mae"]) == 0
    out = capsys.readouterr().out
    expected = np.mean(values_of("boston", "gal", "MAE"))
    assert out.splitlines()[0].startswith(f"Table V/Boston/GAL/MAE/mean = {expected:.4f}")
    assert "mean over 5 seeds of test_mae" in out
    for s in SEEDS:
        assert f"runs/regression/boston-gal-s{s}" in out and site["ids"][f"boston-gal-s{s}"] in out
        assert f"train_regression@boston-gal-{s}" in out
    assert "method.name: baseline -> gal" in out and "method.ratio: <absent> -> 0.01" in out
    assert "method.scale: <absent> -> 1.0" in out and "seed:" not in out  # same seed, so no diff
    assert "(dirty: uncommitted changes)" in out and "md5:" in out
    assert "MLflow cross-check: OK" in out


def test_audit_ttest_by_provenance_key(at_site, capsys):
    assert audit.main(["Table V/Diabetes/t-test/MSE/p"]) == 0
    out = capsys.readouterr().out
    assert "runs/regression/diabetes-baseline-s4" in out and "config diff: none (a baseline run)" in out
    assert "MLflow cross-check: OK" in out


def test_audit_fails_when_mlflow_differs(at_site, tmp_path, monkeypatch, capsys):
    from mlflow.tracking import MlflowClient

    site = at_site
    shutil.copy(site["root"] / "mlflow.db", tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path.as_posix()}/mlflow.db"
    run_id = site["ids"]["boston-gal-s2"]
    MlflowClient(tracking_uri=uri).log_metric(run_id, "test_mae", 99.0, step=1)  # now the latest value
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # the environment wins over run.json's URI
    assert audit.main(["Table V", "Boston", "GAL", "MAE"]) == 1
    out = capsys.readouterr().out
    assert "MLflow cross-check: MISMATCH (1 problem)" in out
    assert f"runs/regression/boston-gal-s2: test_mae is {value('boston', 'gal', 'MAE', 2)!r} in metrics.json " \
           f"but 99.0 in MLflow run {run_id}" in out
    assert audit.main(["Table V", "Boston", "GAL", "MAE", "--tracking-uri", site["uri"]]) == 0  # the flag wins
    assert "MLflow cross-check: OK" in capsys.readouterr().out


def test_audit_stale_reports_are_caught(at_site, tmp_path, monkeypatch, capsys):
    """A run redone after the report (new MLflow run, new value): the audit says the reports are stale."""
    site = at_site
    work = tmp_path / "work"
    shutil.copytree(site["root"] / "runs", work / "runs")
    shutil.copytree(site["root"] / "reports", work / "reports")
    monkeypatch.chdir(work)
    meta_path = Path("runs/regression/boston-gal-s1/run.json")
    meta = json.loads(meta_path.read_text())
    meta["mlflow_run_id"] = site["ids"]["boston-gal-s0"]  # as if s1 had been redone as another MLflow run
    meta_path.write_text(json.dumps(meta))
    assert audit.main(["Table V", "Boston", "GAL", "MAE"]) == 1
    assert "the reports are stale" in capsys.readouterr().out


def test_audit_unknown_names_list_what_exists(at_site, capsys):
    assert audit.main(["Table IX"]) == 2
    assert capsys.readouterr().err.strip() == (
        "audit: no table or figure 'Table IX'; choose one of: " + ", ".join(SPEC_NAMES))
    assert audit.main(["Table V", "Bostn"]) == 2
    err = capsys.readouterr().err
    assert "choose one of: Boston, Diabetes, California" in err and len(err.strip().splitlines()) == 1
    assert audit.main(["Table V", "Boston", "GAL", "RMSE"]) == 2
    assert "choose one of: MAE, MSE, R2" in capsys.readouterr().err
    assert audit.main(["Table V", "--reports", "nowhere"]) == 2
    assert "no nowhere/provenance.json" in capsys.readouterr().err


def test_audit_classification_numbers(at_site, capsys):
    assert audit.main(["Table I", "SGD", "GAL", "error"]) == 0
    out = capsys.readouterr().out
    expected = np.mean(cls_best("cifar10_sgd", "gal", "val_top1_err"))  # at each run's best epoch
    assert out.splitlines()[0] == f"Table I/SGD/GAL/error/mean = {expected:.2f}   (paper: 1.84)"
    assert "MLflow cross-check: OK (3 runs' val_top1_err at the best epoch by val_top1_err match" in out
    assert audit.main(["Table III", "ResNet-50 (RMSProp)", "GAL", "top5"]) == 0  # top-5 at the best top-1 epoch
    assert "runs' val_top5_acc at the best epoch by val_top1_err match" in capsys.readouterr().out
    assert "runs/classification/cifar10_sgd-gal-s2" in out and "train_classification@cifar10_sgd-gal-2" in out
    assert "method.name: baseline -> gal" in out and "MLflow cross-check: OK" in out
    assert audit.main(["Table VII", "ImageNet", "ratio", "time"]) == 0  # op ratio over two groups
    assert "MLflow cross-check: OK (6 runs' time_per_image" in capsys.readouterr().out
    assert audit.main(["Fig. 6", "ResNet-50", "GAL", "remainder"]) == 0  # from history.csv's last row
    out = capsys.readouterr().out
    assert "remainder: run record" in out and "MLflow cross-check: OK" in out


def test_audit_ablation_numbers(at_site, capsys):
    assert audit.main(["Table VI", "Uniform", "error"]) == 0
    out = capsys.readouterr().out
    uniform = np.mean(abl_values("cifar100_sgd", "src-uniform"))
    assert out.splitlines()[0] == f"Table VI/Uniform/error/mean = {uniform:.2f}"
    assert "    variant: src-uniform\n" in out and "remake: dvc repro ablate_noise@cifar100_sgd-src-uniform-0" in out
    assert "config diff from baseline runs/classification/cifar100_sgd-gal-s0" in out  # the preset's run
    assert "method.source: learned -> uniform" in out
    assert "MLflow cross-check: OK" in out
    assert audit.main(["Table VI", "Uniform unnormalised", "diverged_epoch"]) == 0  # the first seed's epoch
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "Table VI/Uniform unnormalised/diverged_epoch/seed0 = 2"
    assert "diverged_epoch: run record 2.0; MLflow 2.0" in out and "MLflow cross-check: OK" in out
    assert audit.main(["Table VIII", "MLP", "256", "error"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].endswith("   (paper: 11.68)") and "MLflow cross-check: OK" in out
    assert audit.main(["Table VI", "t-test", "Learned h vs Uniform", "error", "p"]) == 0
    assert "MLflow cross-check: OK (5 runs' val_top1_err" in capsys.readouterr().out


def test_audit_recomputes_a_holm_adjusted_p_from_its_family(at_site, capsys):
    """Beyond the paper's p_holm: its groups are the bed's five pairs, the adjusted pair first."""
    assert audit.main(["Beyond the paper/Boston, our protocol/GAL, bounded vs Baseline/test_mae/p_holm"]) == 0
    out = capsys.readouterr().out
    assert "MLflow cross-check: OK" in out
    assert "Holm-adjusted two-sided p of Student's t-test, 3 vs 3 seeds of final test_mae, in a family of 5 tests" \
        in out and "runs/regression/boston-gal-prop-bounded-beyond-s2" in out
