"""The report stage (python -m pipelines.report) and the audit (python -m pipelines.audit) on synthetic run
records: Table V's numbers against numpy/scipy, the claims' verdicts, provenance coverage, Fig. 4, the
error paths (missing runs, mixed profiles) and the audit's MLflow cross-check against a tmp sqlite store."""
from __future__ import annotations

import csv
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import stats

from pipelines import audit
from pipelines.report import __main__ as report_cli
from pipelines.report import index
from pipelines.report.model import Rendered

DATASETS = {"boston": "Boston", "diabetes": "Diabetes", "california": "California"}
METHODS = {"baseline": "Baseline", "gal": "GAL"}
METRICS = {"MAE": "test_mae", "MSE": "test_mse", "R2": "test_r2"}
SEEDS = range(5)
OFFSETS = np.array([-1.0, -0.5, 0.0, 0.5, 1.0])
# (dataset, metric) -> ((baseline centre, spread), (GAL centre, spread)), built so that:
#   Boston: GAL clearly better everywhere -> "reproduced";
#   Diabetes MAE: GAL worse -> "not reproduced"; Diabetes MSE: GAL a little better, noisy -> "direction only".
CENTRES = {
    ("boston", "MAE"): ((4.0, 0.4), (2.8, 0.3)), ("boston", "MSE"): ((23.0, 4.0), (12.9, 2.0)),
    ("boston", "R2"): ((0.77, 0.04), (0.87, 0.02)),
    ("diabetes", "MAE"): ((44.0, 0.8), (46.0, 0.3)), ("diabetes", "MSE"): ((3226.0, 40.0), (3220.0, 40.0)),
    ("diabetes", "R2"): ((0.38, 0.007), (0.43, 0.006)),
    ("california", "MAE"): ((1.09, 0.13), (0.78, 0.03)), ("california", "MSE"): ((2.1, 0.36), (1.16, 0.07)),
    ("california", "R2"): ((-0.6, 0.28), (0.12, 0.05)),
}
OPTIMIZERS = {"gd": "GD", "lookahead": "Lookahead(GD)", "rmsprop": "RMSProp", "adam": "Adam", "adabound": "AdaBound"}


def value(dataset: str, method: str, metric: str, seed: int) -> float:
    """Known metric values: over the 5 seeds, exactly centre + spread * OFFSETS (GAL's in a shuffled order)."""
    centre, spread = CENTRES[(dataset, metric)][method == "gal"]
    perm = np.random.RandomState(7 * len(dataset) + len(metric)).permutation(5) if method == "gal" else np.arange(5)
    return float(centre + spread * OFFSETS[perm[seed]])


def surface(x: float, y: float) -> float:
    return -math.sin(x**2) * math.cos(3 * y**2) * math.exp(-((x * y) ** 2)) - math.exp(-((x + y) ** 2))


def write_run(root: Path, task: str, name: str, config: dict, metrics: dict, history: list[dict],
              run_id: str, stage: str, profile: str) -> Path:
    path = root / task / name
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump({**config, "profile": profile}, sort_keys=False))
    (path / "metrics.json").write_text(json.dumps(metrics))
    with open(path / "history.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(history)
    meta = {"task": task, "run_name": name, "mlflow_run_id": run_id, "mlflow_experiment_id": "1",
            "tracking_uri": "sqlite:///mlflow.db", "stage": stage, "git_commit": "0123456789abcdef" * 2 + "01234567",
            "git_dirty": name.endswith("s4"), "profile": profile,
            "data_checksums": {f"data/processed/{config.get('data', {}).get('name', 'toy')}.npz": "md5:" + "ab" * 16},
            "env_lock_sha256": "00" * 32, "created": "2024-01-01T00:00:00+00:00"}
    (path / "run.json").write_text(json.dumps(meta, indent=2))
    return path


def make_runs(root: Path, profile: str = "smoke", skip: tuple = (), profiles: dict | None = None,
              run_ids: dict | None = None) -> dict[str, Path]:
    """Synthetic records: 3 datasets x 2 methods x 5 seeds of regression, 5 optimisers x 2 methods of toy3d.
    ``skip``: run names to leave out; ``profiles``: run name -> another profile; ``run_ids``: name -> id."""
    profiles, run_ids = profiles or {}, run_ids or {}
    made = {}
    for ds in DATASETS:
        for method in METHODS:
            for seed in SEEDS:
                name = f"{ds}-{method}-s{seed}"
                if name in skip:
                    continue
                config = {"task": {"name": "regression", "epochs": 15}, "data": {"name": ds},
                          "method": {"name": method, **({"ratio": 0.01, "scale": 1.0} if method == "gal" else {})},
                          "seed": seed}
                metrics = {src: value(ds, method, key, seed) for key, src in METRICS.items()}
                history = [{"epoch": e, "train_loss": 1.0 / e, "val_mae": 2.0 / e} for e in (1, 2, 3)]
                made[name] = write_run(root, "regression", name, config, metrics, history,
                                       run_ids.get(name, f"id-{name}"), f"train_regression@{ds}-{method}-{seed}",
                                       profiles.get(name, profile))
    for opt, label in OPTIMIZERS.items():
        for method in METHODS:
            name = f"{opt}-{method}"
            if name in skip:
                continue
            target = (0.2, -0.4) if method == "gal" else (-0.5, 0.9)
            steps = 12
            history = []
            for step in range(steps + 1):
                a = step / steps
                x, y = 0.75 + a * (target[0] - 0.75), 1.0 + a * (target[1] - 1.0)
                history.append({"step": step, "x": x, "y": y, "z": surface(x, y),
                                "accepted": "" if method == "baseline" or step == 0 else 1,
                                "remainder": "" if method == "baseline" or step == 0 else 0.01})
            config = {"optimizer": opt, "method": method, "seed": 0, "start": [0.75, 1.0],
                      "run": {"label": label, "lr": 0.1, "steps": steps, "ratio": 0.2, "scale": 1.0,
                              "kwargs": {"k": 5, "alpha": 0.5} if opt == "lookahead" else {}}}
            made[name] = write_run(root, "toy3d", name, config, {"final_z": history[-1]["z"]}, history,
                                   run_ids.get(name, f"id-{name}"), "toy3d", profiles.get(name, profile))
    return made


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def values_of(ds: str, method: str, metric: str) -> np.ndarray:
    return np.array([value(ds, method, metric, s) for s in SEEDS])


OUTPUTS = ["tables/table5.md", "tables/table5.csv", "tables/table5.tex", "tables/claims.md", "tables/claims.csv",
           "tables/claims.tex", "figures/fig4_toy3d.png", "figures/fig4_toy3d.pdf", "figures/fig4_toy3d.csv",
           "index.md", "provenance.json"]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A working directory with runs/, an MLflow sqlite store holding every run, and reports/ rendered."""
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("site")
    uri = f"sqlite:///{root.as_posix()}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("regression")
    ids = {}
    for ds in DATASETS:
        for method in METHODS:
            for seed in SEEDS:
                run = client.create_run(exp, run_name=f"{ds}-{method}-s{seed}")
                for key, src in METRICS.items():
                    client.log_metric(run.info.run_id, src, value(ds, method, key, seed))
                client.set_terminated(run.info.run_id)
                ids[f"{ds}-{method}-s{seed}"] = run.info.run_id
    old = os.getcwd()
    os.chdir(root)
    try:
        make_runs(Path("runs"), run_ids=ids)
        for name in ids:  # point each record at the tmp store
            meta_path = Path("runs/regression") / name / "run.json"
            meta = json.loads(meta_path.read_text())
            meta["tracking_uri"] = uri
            meta_path.write_text(json.dumps(meta))
        assert report_cli.main(["--runs", "runs", "--out", "reports"]) == 0
    finally:
        os.chdir(old)
    return {"root": root, "uri": uri, "ids": ids, "out": root / "reports"}


def test_every_output_exists(site):
    for rel in OUTPUTS:
        assert (site["out"] / rel).is_file(), rel
    assert not [p for p in site["out"].iterdir() if p.name.startswith(".report-")]  # temp dir cleaned up


def test_table5_means_and_stds_equal_numpy(site):
    rows = {r["key"]: r for r in read_csv(site["out"] / "tables/table5.csv")}
    for ds, ds_name in DATASETS.items():
        for method, method_name in METHODS.items():
            for metric in METRICS:
                v = values_of(ds, method, metric)
                base = f"Table V/{ds_name}/{method_name}/{metric}"
                assert float(rows[f"{base}/mean"]["value"]) == pytest.approx(np.mean(v), rel=1e-12)
                assert float(rows[f"{base}/std"]["value"]) == pytest.approx(np.std(v, ddof=1), rel=1e-12)
                assert float(rows[f"{base}/n"]["value"]) == 5
    boston = rows["Table V/Boston/GAL/MAE/mean"]
    assert (boston["paper"], boston["text"]) == ("2.8079", f"{np.mean(values_of('boston', 'gal', 'MAE')):.4f}")


def test_table5_ttests_equal_scipy(site):
    rows = {r["key"]: r for r in read_csv(site["out"] / "tables/table5.csv")}
    for ds, ds_name in DATASETS.items():
        for metric in METRICS:
            expected = stats.ttest_ind(values_of(ds, "baseline", metric), values_of(ds, "gal", metric),
                                       equal_var=True)
            key = f"Table V/{ds_name}/t-test/{metric}"
            assert float(rows[f"{key}/t"]["value"]) == pytest.approx(expected.statistic, rel=1e-12)
            assert float(rows[f"{key}/p"]["value"]) == pytest.approx(expected.pvalue, rel=1e-12)
    # the sign convention: baseline minus GAL, so GAL's lower Boston MAE gives t > 0, its higher R2 t < 0
    assert float(rows["Table V/Boston/t-test/MAE/t"]["value"]) > 0 > float(rows["Table V/Boston/t-test/R2/t"]["value"])


def test_table5_shows_the_paper_beside_ours(site):
    md = (site["out"] / "tables/table5.md").read_text()
    assert "3.9535 ± 0.4307" in md and "5.02, 1.02e-03" in md and "-5.78, 4.14e-04" in md
    ours = f"{np.mean(values_of('boston', 'gal', 'MAE')):.4f} ± {np.std(values_of('boston', 'gal', 'MAE'), ddof=1):.4f}"
    assert ours in md
    tex = (site["out"] / "tables/table5.tex").read_text()
    assert r"\begin{tabular}" in tex and r"$\pm$" in tex and r"R$^2$" in tex


def test_claims_verdicts(site):
    claims = {(r["subject"], r["metric"]): r for r in read_csv(site["out"] / "tables/claims.csv")}
    assert len(claims) == 9  # the paper claims GAL better on 3 datasets x 3 metrics
    assert {c["verdict"] for k, c in claims.items() if k[0] == "Boston"} == {"reproduced"}
    worse = claims[("Diabetes", "MAE")]
    assert (worse["verdict"], worse["direction_reproduced"]) == ("not reproduced", "False")
    assert worse["paper_gal"] == "41.6186"
    noisy = claims[("Diabetes", "MSE")]
    assert (noisy["verdict"], noisy["direction_reproduced"], noisy["significant"]) == \
        ("direction only", "True", "False")
    assert float(noisy["ours_p"]) >= 0.05
    assert "Table V/Diabetes/t-test/MSE/p" in noisy["provenance_keys"]
    md = (site["out"] / "tables/claims.md").read_text()
    assert "not reproduced" in md and "direction only" in md


def test_provenance_covers_every_rendered_number(site):
    prov = json.loads((site["out"] / "provenance.json").read_text())
    numbers = prov["numbers"]
    rows = read_csv(site["out"] / "tables/table5.csv") + read_csv(site["out"] / "figures/fig4_toy3d.csv")
    assert len(rows) == 3 * (2 * 3 * 3 + 3 * 2) + 10
    for row in rows:
        entry = numbers[row["key"]]
        assert entry["value"] == pytest.approx(float(row["value"]), rel=1e-12)
        assert entry["aggregation"] and entry["runs"] and entry["dvc_repro"]
    entry = numbers["Table V/Boston/GAL/MAE/mean"]
    assert entry["aggregation"].startswith("mean over 5 seeds of test_mae")
    assert [r["dir"] for r in entry["runs"]] == [f"runs/regression/boston-gal-s{s}" for s in SEEDS]
    assert [r["mlflow_run_id"] for r in entry["runs"]] == [site["ids"][f"boston-gal-s{s}"] for s in SEEDS]
    assert entry["dvc_repro"] == [f"train_regression@boston-gal-{s}" for s in SEEDS]
    assert all(r["git_commit"] for r in entry["runs"])
    ttest = numbers["Table V/Boston/t-test/MAE/t"]
    assert len(ttest["groups"]) == 2 and ttest["groups"][0][0] == "runs/regression/boston-baseline-s0"
    assert "tables/claims.md" in ttest["files"] and "tables/table5.md" in ttest["files"]
    assert prov["runs"]["runs/regression/boston-gal-s3"]["baseline"] == "runs/regression/boston-baseline-s3"
    assert prov["profiles"] == {"Table V": "smoke", "Fig. 4": "smoke"}
    for claim in read_csv(site["out"] / "tables/claims.csv"):  # the claims' numbers are Table V's
        for key in claim["provenance_keys"].split("; "):
            assert key in numbers, key


def test_fig4_numbers_and_figure(site):
    rows = {r["key"]: r for r in read_csv(site["out"] / "figures/fig4_toy3d.csv")}
    z = surface(0.75 + (0.2 - 0.75), 1.0 + (-0.4 - 1.0))
    assert float(rows["Fig. 4/Lookahead(GD)/GAL/final_z"]["value"]) == pytest.approx(z)
    assert (site["out"] / "figures/fig4_toy3d.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert b"CreationDate" not in (site["out"] / "figures/fig4_toy3d.pdf").read_bytes()


def test_index_shows_everything_and_warns_about_smoke(site):
    text = (site["out"] / "index.md").read_text()
    assert text.splitlines()[0] == "# GAL reproduction: results (profile `smoke`)"
    assert "SMOKE PROFILE" in text and "mean" in text and "nothing about the paper" in text
    assert "![Fig. 4" in text and "(figures/fig4_toy3d.png)" in text
    assert "| Dataset | Method | n |" in text and "## Claims" in text and "not reproduced" in text
    real = [Rendered(name="Table V", slug="table5", kind="table", profile="regression", numbers=[], markdown="")]
    assert index.smoke_banner(real) == "" and "`regression`" in index.profile_title(real)


def test_rerun_gives_the_same_bytes(site, tmp_path, monkeypatch):
    monkeypatch.chdir(site["root"])
    again = tmp_path / "again"
    assert report_cli.main(["--runs", "runs", "--out", str(again)]) == 0
    for rel in OUTPUTS:
        if rel != "index.md":  # index names the out dir's runs root the same way, but check it too below
            assert (again / rel).read_bytes() == (site["out"] / rel).read_bytes(), rel
    assert (again / "index.md").read_text() == (site["out"] / "index.md").read_text()


def _snapshot(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}


def test_missing_runs_fail_in_one_line_and_keep_old_reports(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    make_runs(Path("runs"), skip=("boston-gal-s3", "california-baseline-s0"))
    out = Path("reports")
    (out / "tables").mkdir(parents=True)
    (out / "tables/table5.md").write_text("previous\n")
    before = _snapshot(out)
    assert report_cli.main(["--runs", "runs", "--out", "reports"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "Table V: missing runs" in err and "boston/gal seed=3" in err and "california/baseline seed=0" in err
    assert _snapshot(out) == before


def test_missing_toy3d_run_is_named(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    make_runs(Path("runs"), skip=("adam-gal",))
    assert report_cli.main([]) == 2
    err = capsys.readouterr().err
    assert "Fig. 4: missing runs" in err and "adam/gal" in err
    assert not Path("reports/index.md").exists() and not Path("reports/tables/table5.md").exists()
    assert not list(Path("reports").glob(".report-*"))  # Table V rendered fine, but nothing was moved in


def test_no_runs_at_all(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert report_cli.main(["--runs", "runs", "--out", "reports"]) == 2
    assert "Table V: no runs under runs/regression" in capsys.readouterr().err


def test_mixed_profiles_fail(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    make_runs(Path("runs"), profiles={"diabetes-gal-s1": "regression"})
    assert report_cli.main([]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "Table V: runs come from mixed profiles" in err and "runs/regression/diabetes-gal-s1" in err
    assert not Path("reports/index.md").exists()


def test_asked_profile_must_match(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    make_runs(Path("runs"))
    assert report_cli.main(["profile=regression"]) == 2
    assert "profile 'smoke' but profile=regression" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ audit
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
    assert capsys.readouterr().err.strip() == "audit: no table or figure 'Table IX'; choose one of: Table V, Fig. 4"
    assert audit.main(["Table V", "Bostn"]) == 2
    err = capsys.readouterr().err
    assert "choose one of: Boston, Diabetes, California" in err and len(err.strip().splitlines()) == 1
    assert audit.main(["Table V", "Boston", "GAL", "RMSE"]) == 2
    assert "choose one of: MAE, MSE, R2" in capsys.readouterr().err
    assert audit.main(["Table V", "--reports", "nowhere"]) == 2
    assert "no nowhere/provenance.json" in capsys.readouterr().err
