"""What we found (pipelines/report/findings.py): README.md's block is what its named report gives; a report of smoke
runs states no finding; a report whose Table V ran under the regression profile states its verdicts, protocol and
measured reasons from the report's own files, and what has not run for real; GPU-hours come only from a GPU
preflight; index.md opens with the same findings; the command rewrites only the block."""
from __future__ import annotations

import os
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest

from pipelines.report import __main__ as report_cli
from pipelines.report import findings
from tests.pipelines.report_fixtures import (BEYOND_ARMS, BEYOND_BEDS, BEYOND_SEEDS, DATASETS, H_STATS,
                                             PROTOCOL_RUNS, SEEDS, make_runs, read_csv, set_values,
                                             write_precision_records)

ROOT = Path(__file__).resolve().parents[2]
PREFLIGHT_COLUMNS = ["stage", "run", "seeds", "device", "processes", "batch/device", "step s", "images/s/device",
                     "loader wait", "peak memory", "checkpoint", "device-h/run", "device-h (all seeds)", "status"]


def flat(text: str) -> str:
    """``text`` unwrapped: one space between words, a quote's continuation joined (the findings wrap at 116)."""
    return " ".join(text.replace("\n> ", " ").split())


def items(text: str) -> list[str]:
    """The list items of ``text``, each unwrapped."""
    return [flat(item) for item in re.split(r"\n\s*- ", "\n" + text)[1:]]


@pytest.fixture(scope="module")
def regression(tmp_path_factory) -> Path:
    """A report as the regression profile makes it: Table V, its protocol study and the precision study from
    regression runs (with h's statistics), the image tables and Fig. 4 from smoke runs."""
    root = tmp_path_factory.mktemp("regression")
    names = [f"{ds}-{m}-{v + '-' if v else ''}s{s}" for ds in DATASETS
             for v, (methods, _, _) in PROTOCOL_RUNS.items() for m in methods for s in SEEDS]
    old = os.getcwd()
    os.chdir(root)
    try:
        beyond = [f"{setting}-{method['name']}-{token.removesuffix('-row')}-s{s}" for _, setting, _ in BEYOND_BEDS
                  for token, (method, *_) in BEYOND_ARMS.items() for s in BEYOND_SEEDS]
        made = make_runs(Path("runs"), profiles=dict.fromkeys(names + beyond, "regression"))
        for name, path in made.items():
            if name.split("-")[0] in DATASETS and name.split("-")[1] == "gal":
                set_values(path, H_STATS, add=True)
        write_precision_records(Path("runs"), profile="regression")
        assert report_cli.main(["--runs", "runs", "--out", "reports"]) == 0
    finally:
        os.chdir(old)
    return root / "reports"


def test_the_readme_block_is_what_its_report_gives():
    """The README names the folder its block comes from; rewriting it from that folder changes nothing. A stale
    block (a report published or republished since) fails here: run `python -m pipelines.report.findings`."""
    text = (ROOT / "README.md").read_text()
    source = findings.START.search(text).group(1)
    assert findings.spliced(text, ROOT) == text, f"README's findings block is not what {source}/ gives"
    assert not source.startswith("reports"), "the README's findings come from a published report, not reports/"
    if (ROOT / source).exists():  # a published report holds real runs: smoke numbers are never findings
        report = findings.load(ROOT / source)
        assert set(report.profiles.values()) != {findings.SMOKE}, f"{source}/ holds smoke runs only"


def test_a_smoke_report_states_no_finding(site):
    text = findings.block(site["root"], "reports")
    assert all(len(line) <= findings.WIDTH for line in text.splitlines())
    assert flat(text).startswith("*Written by `python -m pipelines.report.findings` from the report in `reports/` "
                                 "(profiles `smoke`: ")
    assert "[!WARNING] **SMOKE: every number in this report comes from fixture-sized data and means nothing about the " \
           "paper; nothing below is a finding.**" in flat(text)
    assert "- **Run for real:** nothing yet" in text
    assert "**Reproduced**" not in text and "**Why, measured:**" not in text and "of 9 reproduced" not in text
    _, _, regression, paper, skipped = items(text)
    assert regression.startswith("Table V, Protocol study, Protocol curves, Fig. 4")
    assert regression.endswith("`make repro PROFILE=regression` (CPU).")
    assert paper.startswith("Table I, Table II, Table III, Table IV, Table VI") and "PROFILE=paper` (GPUs)" in paper
    assert "GPU-hours not measured yet (no GPU preflight is part of this report" in paper
    # the site has no precision records nor h's statistics: those two are skipped, and said so
    assert skipped == "Skipped, their runs missing from the report: Table V at d = 1, Precision study."


def test_a_regression_report_states_table5_from_its_files(regression):
    text = flat(findings.findings(findings.load(regression), where="results/regression/"))
    claims = [c for c in read_csv(regression / "tables/claims.csv") if c["table"] == "Table V"]
    counts = Counter(c["verdict"] for c in claims)
    assert "SMOKE" not in text
    assert ("- **Run for real:** Table V (profile `regression`): 9 claims (Boston, Diabetes, California; MAE, MSE, "
            "R²), 5 + 5 runs per claim, under our protocol (`pipelines/conf/task/regression.yaml`") in text
    assert "Also from real runs: Protocol study, Protocol curves, Table V at d = 1, Precision study, Beyond the " \
           "paper, Beyond the paper (figure)." in text
    # our own study, apart from the paper's claims: only the bounded arm beat the baseline, on Boston
    assert "Beyond the paper (ours, not a claim of the paper):" in text
    assert "GAL, batch beat the baseline on 0 of 2 test beds; GAL, bounded beat the baseline on 1 of 2 test beds " \
           "(Boston, our protocol)" in text
    assert "`results/regression/tables/claims.md`" in text
    assert f"Table V: {counts['reproduced']} of 9 reproduced ({counts['direction only']} direction only, " \
           f"{counts['not reproduced']} not reproduced)" in text
    boston = [c for c in claims if c["closest_verdict"]]  # the fixture's study runs are Boston's
    closest = Counter(c["closest_verdict"] for c in boston)["reproduced"]
    assert f"(Boston: `{boston[0]['closest_protocol']}`, {float(boston[0]['closest_distance']):.2f} of the paper's " \
           f"standard deviations): {closest} of 3 reproduced" in text
    # the measured reasons, each from its table's CSV
    assert "h's gradient norm Boston 1.00e-12, Diabetes 1.00e-12, California 1.00e-12" in text
    assert "the fraction of steps the safeguard accepted: Boston 0.9, Diabetes 0.9, California 0.9" in text
    r2 = {c["subject"]: c for c in claims if c["metric"] == "R²"}
    assert f"California {float(r2['California']['paper_baseline']):.3g} vs " \
           f"{float(r2['California']['ours_baseline']):.3g}" in text
    assert "Boston: 2 protocols and 1 value of eps for GAL alone" in text
    assert "at ImageNet, ResNet-50 (median |R| 0.066 float32 spacings of L) GAL's remainder is below float32's " \
           "resolution" in text and "the other setting resolves it (median |R| 728 spacings)" in text
    # what has not run for real: the image tables (and the smoke toy), never Table V
    not_run = text.split("- **Not yet run for real**")[1]
    assert not re.search("Table V(?!I)", not_run) and \
        "Fig. 4: `make repro PROFILE=regression` (CPU)." in not_run
    image = sum(c["table"] in ("Table I", "Table II", "Table III", "Table IV", "Table VI", "Table VIII", "Fig. 8a")
                for c in read_csv(regression / "tables/claims.csv"))
    assert f"Fig. 8a, Fig. 8b ({image} claims): `make repro PROFILE=paper` (GPUs)" in not_run


def write_preflight(path: Path, rows: list[tuple[str, str, str, str, str]]) -> None:
    """preflight.csv with (stage, seeds, device, device-h (all seeds), status) rows."""
    lines = [",".join(PREFLIGHT_COLUMNS)]
    for stage, seeds, device, hours, status in rows:
        cells = dict.fromkeys(PREFLIGHT_COLUMNS, "")
        cells.update({"stage": stage, "run": "r", "seeds": seeds, "device": device, "device-h (all seeds)": hours,
                      "status": status})
        lines.append(",".join(f'"{cells[c]}"' for c in PREFLIGHT_COLUMNS))
    path.write_text("\n".join(lines) + "\n")


def test_gpu_hours_come_from_a_gpu_preflight_only(regression, tmp_path):
    report = tmp_path / "results"
    shutil.copytree(regression, report)
    write_preflight(report / "preflight.csv", [("train_regression", "5", "cpu", "0.00317", "ok"),
                                               ("train_cifar", "2", "cuda", "1,234", "ok"),
                                               ("train_detection", "2", "cuda", "500", "FAILED: out of memory")])
    text = flat(findings.findings(findings.load(report), where="results/"))
    assert "a GPU preflight (`results/preflight.csv`) estimates 1,734 GPU-hours for its 4 runs, 1 configurations " \
           "failing." in text
    write_preflight(report / "preflight.csv", [("train_cifar", "2", "cpu", "27,212", "ok")])
    text = flat(findings.findings(findings.load(report), where="results/"))
    assert "GPU-hours not measured yet (the preflight here ran on a CPU, whose device-hours say nothing of GPUs" in text
    assert "27,212" not in text


def test_index_opens_with_what_we_found(site, regression):
    for out in (site["out"], regression):
        index = (out / "index.md").read_text()
        section = index.split("\n## What we found\n\n")[1].split("\n## ")[0]
        assert section == findings.findings(findings.load(out, preflight=False), banner=False)
        assert index.index("## What we found") < index.index("## Table I")
    assert "SMOKE: every number in this report" not in (site["out"] / "index.md").read_text()  # its banner says it


def test_the_command_rewrites_only_the_block(regression, tmp_path, capsys):
    shutil.copytree(regression, tmp_path / "results/regression")
    readme = tmp_path / "README.md"
    readme.write_text("# Title\n\nbefore\n<!-- findings:start report=results/regression -->\nold text\n"
                      "<!-- findings:end -->\nafter\n")
    args = ["--readme", str(readme)]
    assert findings.main([*args, "--check"]) == 1
    assert "README.md's block is not what its report gives" in capsys.readouterr().err
    assert "old text" in readme.read_text()  # --check changes nothing
    assert findings.main(args) == 0
    text = readme.read_text()
    assert text.startswith("# Title\n\nbefore\n<!-- findings:start report=results/regression -->\n*Written by ")
    assert text.endswith("\n<!-- findings:end -->\nafter\n") and "old text" not in text
    assert text.split("-->\n", 1)[1].split("<!-- findings:end")[0] == findings.block(tmp_path, "results/regression")
    assert findings.main([*args, "--check"]) == 0 and findings.main(args) == 0 and readme.read_text() == text
    # a folder not yet published: the block says so; one named by --report must exist
    readme.write_text(text.replace("report=results/regression", "report=results/paper"))
    assert findings.main(args) == 0
    assert "**No report of real runs is published in this repository yet** (`results/paper/` does not exist" in \
        flat(readme.read_text())
    capsys.readouterr()
    assert findings.main([*args, "--report", "results/nothing"]) == 2
    assert capsys.readouterr().err.startswith("findings: no report folder results/nothing beside ")


@pytest.mark.parametrize("text", ["no markers\n", "<!-- findings:start report=a -->\n",
                                  "<!-- findings:end -->\n<!-- findings:start report=a -->\n",
                                  "<!-- findings:start report=a -->\n<!-- findings:start report=b -->\n"
                                  "<!-- findings:end -->\n"])
def test_a_readme_without_one_block_is_one_line(tmp_path, capsys, text):
    readme = tmp_path / "README.md"
    readme.write_text(text)
    assert findings.main(["--readme", str(readme)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("findings: README needs exactly one `<!-- findings:start report=<folder> -->` line") and \
        err.count("\n") == 1
    assert readme.read_text() == text


def test_the_paths_the_findings_name_exist():
    """The findings point readers at files (the protocol's config, the width-1 proof, the docs): they must exist."""
    source = (ROOT / "pipelines/report/findings.py").read_text()
    paths = set(re.findall(r"`((?:docs|pipelines|tests)/[^`*\s]+)`", source))
    assert {"pipelines/conf/task/regression.yaml", "tests/gal_core/test_width_one.py", "docs/preflight.md"} <= paths
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert not missing, missing
