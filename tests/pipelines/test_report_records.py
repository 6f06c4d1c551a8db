"""Run records as the report reads them: a metric or history value that is not a finite number is refused,
naming the file, and so is a record file that parses but holds no mapping."""
from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

from pipelines.report import __main__ as report_cli
from pipelines.report.model import Context
from pipelines.report.records import ReportError
from pipelines.report.specs import fig6
from tests.pipelines.report_fixtures import edit_run, make_runs, read_csv


@pytest.mark.parametrize("value, shown", [(math.nan, "NaN"), (math.inf, "Infinity"), ("3.1", '"3.1"'),
                                          (None, "null"), (True, "true")])
def test_non_finite_metric_is_refused(tmp_path, monkeypatch, capsys, value, shown):
    monkeypatch.chdir(tmp_path)
    made = make_runs(Path("runs"))
    edit_run(made["boston-gal-s2"], metrics=lambda m: m.update(test_mae=value))
    assert report_cli.main([]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"report: runs/regression/boston-gal-s2/metrics.json: test_mae is {shown}, not a finite number; "
                   "rerun that run or remove it")
    assert not Path("reports").exists()


def test_non_finite_history_value_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    made = make_runs(Path("runs"))
    path = made["imagenet_resnet50-gal-s1"] / "history.csv"
    rows = read_csv(path)
    rows[1]["cosine"] = "nan"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(ReportError, match=r"^runs/classification/imagenet_resnet50-gal-s1/history\.csv: cosine is "
                                          r"'nan' in the row of epoch 2, not a finite number"):
        fig6.SPEC.render(Context(runs_root=Path("runs"), out=Path("out")))


@pytest.mark.parametrize("name, text, kind", [("run.json", "[]", "list"), ("metrics.json", '"3.1"', "str"),
                                              ("config.yaml", "- seed\n", "list")])
def test_a_record_file_without_a_mapping_is_refused(tmp_path, monkeypatch, capsys, name, text, kind):
    monkeypatch.chdir(tmp_path)
    made = make_runs(Path("runs"))
    (made["boston-gal-s2"] / name).write_text(text)
    assert report_cli.main([]) == 2
    assert capsys.readouterr().err == (f"report: unreadable run record runs/regression/boston-gal-s2: {name} holds a "
                                       f"{kind}, not a mapping; rerun that run or remove it\n")
    assert not Path("reports").exists()
