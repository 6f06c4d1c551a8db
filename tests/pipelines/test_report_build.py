"""The report stage (python -m pipelines.report) as a whole, on synthetic run records: every output written,
provenance covering every rendered number, index.md, byte-identical reruns, the report importing no
training module, and cells whose runs come from different git commits flagged."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.report import __main__ as report_cli
from pipelines.report import index
from pipelines.report.model import Rendered
from tests.pipelines.report_fixtures import FIGURES, SEEDS, SPEC_NAMES, edit_run, make_runs, read_csv


OUTPUTS = [f"tables/{t}.{ext}" for t in ("table1", "table2", "table3", "table4", "table5", "table6", "table7", "table8",
                                         "claims")
           for ext in ("md", "csv", "tex")]
OUTPUTS += [f"figures/{f}.{ext}" for f in FIGURES for ext in ("png", "pdf", "csv")] + ["index.md", "provenance.json"]
OUTPUTS += [f"tables/protocol_study.{ext}" for ext in ("md", "csv", "tex")]
OUTPUTS += [f"figures/protocol_curves.{ext}" for ext in ("png", "pdf", "csv")]


def test_every_output_exists(site):
    for rel in OUTPUTS:
        assert (site["out"] / rel).is_file(), rel
    assert not [p for p in site["out"].iterdir() if p.name.startswith(".")]  # temp dirs cleaned up
    assert not list(site["root"].glob(".reports.tmp-*"))


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
    assert prov["profiles"] == {name: "smoke" for name in SPEC_NAMES}
    for claim in read_csv(site["out"] / "tables/claims.csv"):  # the claims' numbers are Table V's
        for key in claim["provenance_keys"].split("; "):
            assert key in numbers, key


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


def test_report_imports_no_training_module():
    code = ("import sys, pipelines.report.__main__, pipelines.report.specs; "
            "print([m for m in sys.modules if m.split('.')[0] == 'torch' or m == 'pipelines.toy3d' "
            "or m.startswith('pipelines.tasks')])")
    result = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_provenance_holds_nan_and_infinities_as_json_and_reads_them_back():
    # a t-test of two groups without variance is infinite: provenance.json stays valid JSON and the audit's
    # float() reads the same value back
    from pipelines.report import provenance
    from pipelines.report.model import Number

    numbers = [Number(key=f"T/{name}/t", value=value, text=str(value), op="t", metric="m", groups=[[], []],
                      aggregation="t") for name, value in (("inf", float("inf")), ("minus", -float("inf")),
                                                         ("nan", float("nan")), ("one", 1.5))]
    item = Rendered(name="T", slug="t", kind="table", profile="smoke", numbers=numbers, markdown="")
    text = provenance.dumps(provenance.build([item], {"T": []}))
    stored = {k: v["value"] for k, v in json.loads(text)["numbers"].items()}
    assert stored == {"T/inf/t": "inf", "T/minus/t": "-inf", "T/nan/t": None, "T/one/t": 1.5}
    assert float(stored["T/inf/t"]) == float("inf") and float(stored["T/minus/t"]) == -float("inf")


def test_runs_of_one_cell_from_different_commits_are_flagged(tmp_path, monkeypatch):
    """Two of Boston GAL's five runs come from another commit: the report takes them (same data and config),
    says so under every table and figure that averages them (and in index.md), and provenance.json lists each
    number's commits per group; cells of one commit stay unflagged."""
    monkeypatch.chdir(tmp_path)
    made = make_runs(Path("runs"))
    commit, other = "0123456789abcdef" * 2 + "01234567", "fedcba9876543210" * 2 + "fedcba98"
    for seed in (3, 4):
        edit_run(made[f"boston-gal-s{seed}"], meta=lambda m: m.update(git_commit=other))
    assert report_cli.main([]) == 0
    note = ("runs from more than one git commit averaged in one cell: Boston / GAL (2 commits: 0123456, fedcba9); "
            "their data are the same, their code may differ (provenance.json lists each number's commits)")
    assert Path("reports/tables/table5.md").read_text().endswith(f"\n- {note}\n")
    sections = Path("reports/index.md").read_text().split("\n## ")
    flagged = [s.splitlines()[0] for s in sections if "more than one git commit" in s]
    assert flagged == ["Table V", "Protocol study", "Protocol curves"]  # the protocol study takes Table V's runs
    assert f"> [!WARNING]\n> {note}.\n" in sections[[s.splitlines()[0] for s in sections].index("Table V")]
    assert "git commits" not in Path("reports/tables/table1.md").read_text()
    numbers = json.loads(Path("reports/provenance.json").read_text())["numbers"]
    assert numbers["Table V/Boston/GAL/MAE/mean"]["commits"] == [[commit, other]]
    assert numbers["Table V/Boston/t-test/MAE/p"]["commits"] == [[commit], [commit, other]]
    assert numbers["Table V/Diabetes/GAL/MAE/mean"]["commits"] == [[commit]]
