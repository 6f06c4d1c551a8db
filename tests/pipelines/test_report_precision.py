"""The report's issue-15 sections on synthetic run records: the precision-study table, Fig. 6's rounding note, and
the d = 1 table beside Table V (numbers against numpy, the statements carry them, old records are skipped)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipelines.report.build import build
from pipelines.report.model import Context, Rendered, Skipped
from pipelines.report.records import MissingRuns
from pipelines.report.specs import precision, width_one
from pipelines.report.specs.precision import rounding_note

DATASETS = ("boston", "diabetes", "california")
STATS = ("adjuster_grad_norm", "adjuster_move_rel", "accepted", "remainder_ulps")


def write_run(root: Path, task: str, name: str, config: dict, metrics: dict, history: list[dict],
              profile: str = "smoke") -> None:
    path = root / task / name
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump({**config, "profile": profile}))
    (path / "metrics.json").write_text(json.dumps(metrics))
    with open(path / "history.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
    (path / "run.json").write_text(json.dumps({"task": task, "run_name": name, "variant": "", "stage": task,
                                               "mlflow_run_id": f"id-{name}", "git_commit": "0" * 40,
                                               "git_dirty": False, "profile": profile}))


PRECISION = {  # setting -> (median |R| ulps, sign agreement, ties)
    "imagenet_resnet50": (0.066, 0.125, 1.0), "cifar10_sgd": (728.0, 1.0, 0.0), "boston": (1620.0, 1.0, 0.0)}


def precision_runs(root: Path) -> None:
    for setting, (ulps, sign, ties) in PRECISION.items():
        config = {"task": "precision", "setting": setting, "output": {"rows": 800, "dim": 1000},
                  "gal": {"lr": 0.016, "ratio": 0.001, "scale": 0.001}}
        metrics = {"sign_agreement": sign, "decision_agreement": 1.0, "tie_fraction_float32": ties,
                   "median_remainder": ulps * 5e-7, "median_remainder_ulps": ulps, "median_loss": 3.0,
                   "rounding": float(ulps < 1), "draws": 60.0}
        write_run(root, "precision", setting, config, metrics, [{"trial": 1, "remainder_ulps": ulps}])


def regression_values(ds: str, seed: int, epoch: int) -> dict:
    rng = np.random.RandomState(hash((ds, seed, epoch)) % 2**31)
    return {"adjuster_grad_norm": 1e-12 * (1 + rng.rand()), "adjuster_move_rel": 1e-8 * (1 + rng.rand()),
            "accepted": 0.9 + 0.1 * rng.rand(), "remainder_ulps": 2000 * (1 + rng.rand())}


def regression_runs(root: Path, with_stats: bool = True) -> None:
    for ds in DATASETS:
        for seed in range(3):
            history = [{"epoch": e, "train_loss": 0.1, **(regression_values(ds, seed, e) if with_stats else {})}
                       for e in (1, 2)]
            write_run(root, "regression", f"{ds}-gal-s{seed}", {"data": {"name": ds}, "method": {"name": "gal"},
                                                                 "seed": seed}, {"test_mae": 1.0}, history)


def test_precision_table_numbers_and_verdicts(tmp_path):
    precision_runs(tmp_path / "runs")
    rendered = precision.SPEC.render(Context(runs_root=tmp_path / "runs", out=tmp_path))
    rows = {row[0]: row for row in rendered.layout.rows}
    assert list(rows) == ["CIFAR-10, SGD", "ImageNet, ResNet-50", "Boston"]  # the paper's order, not the dirs'
    assert rows["ImageNet, ResNet-50"][-2:] == ["rounding", "60"] and rows["Boston"][-2] == "resolved"
    assert rows["ImageNet, ResNet-50"][7] == "12%"  # the sign agreement column
    numbers = {n.key: n for n in rendered.numbers}
    key = "Precision study/ImageNet, ResNet-50/median_remainder_ulps"
    assert numbers[key].value == 0.066 and numbers[key].op == "value" and len(numbers[key].runs) == 1
    assert "h is trained on rounding): ImageNet, ResNet-50." in rendered.markdown


def test_fig6_note_says_where_the_remainder_is_rounding(tmp_path):
    ctx = Context(runs_root=tmp_path / "runs", out=tmp_path)
    assert "its records are missing (make them with `dvc repro precision`)" in rounding_note(ctx, ["imagenet_resnet50"])
    precision_runs(tmp_path / "runs")
    note = rounding_note(Context(runs_root=tmp_path / "runs", out=tmp_path), ["imagenet_resnet50"])
    assert "ImageNet, ResNet-50: median |R| 3.3e-08 = 0.066 float32 spacings of L" in note
    assert "agrees with float64's in 12% of 60 draws" in note and "the remainder curve of a float32 run there is " \
        "rounding" in note
    assert "float32 resolves the remainder" in rounding_note(Context(runs_root=tmp_path / "runs", out=tmp_path),
                                                             ["cifar10_sgd"])


def test_claims_note_names_the_settings_that_train_h_on_rounding(tmp_path):
    assert precision.claims_note(Context(runs_root=tmp_path / "runs", out=tmp_path)) is None
    precision_runs(tmp_path / "runs")
    note = precision.claims_note(Context(runs_root=tmp_path / "runs", out=tmp_path))
    assert note.startswith("Precision study (profile smoke; ") and "at ImageNet, ResNet-50 GAL's remainder" in note
    assert "median |R| 0.066 float32 spacings" in note and "in 12% of draws, its trial loss ties with L in 100%" in note
    assert note.endswith("at the other 2 settings float32 resolves it (sign agreement 100%).")


def test_width_one_table_is_the_runs_last_epoch_over_seeds(tmp_path):
    regression_runs(tmp_path / "runs")
    rendered = width_one.SPEC.render(Context(runs_root=tmp_path / "runs", out=tmp_path))
    numbers = {n.key: n for n in rendered.numbers}
    for ds, label in width_one.DATASETS.items():
        for column in STATS:
            last = np.array([regression_values(ds, seed, 2)[column] for seed in range(3)])
            assert numbers[f"Table V at d = 1/{label}/GAL/{column}/mean"].value == pytest.approx(last.mean(), rel=1e-12)
            assert numbers[f"Table V at d = 1/{label}/GAL/{column}/std"].value == pytest.approx(last.std(ddof=1))
    statement = rendered.layout.notes[0]
    boston = numbers["Table V at d = 1/Boston/GAL/adjuster_grad_norm/mean"].text
    assert f"h's gradient norm Boston {boston}" in statement and "does not rule out" in statement
    assert [row[0] for row in rendered.layout.rows] == ["Boston", "Diabetes", "California"]  # no CIFAR runs here


def test_width_one_shows_a_wider_output_for_contrast(tmp_path):
    regression_runs(tmp_path / "runs")
    for seed in range(2):
        history = [{"epoch": 1, "adjuster_grad_norm": 3e-4, "adjuster_move_rel": 2e-3, "accepted": 0.5,
                    "remainder_ulps": 90.0}]
        write_run(tmp_path / "runs", "classification", f"cifar10_sgd-gal-s{seed}",
                  {"experiment": "cifar10_sgd", "method": {"name": "gal"}, "seed": seed}, {}, history)
    rendered = width_one.SPEC.render(Context(runs_root=tmp_path / "runs", out=tmp_path))
    assert rendered.layout.rows[-1][:3] == ["CIFAR-10, SGD (d = 10)", "2", "3.00e-04 ± 0"]
    assert "For contrast, at d = 10 (CIFAR-10, SGD (d = 10)): gradient norm 3.00e-04" in rendered.layout.notes[0]


def test_old_records_skip_the_sections_and_the_report_still_renders(tmp_path):
    regression_runs(tmp_path / "runs", with_stats=False)  # recorded before h's statistics were logged
    with pytest.raises(MissingRuns, match="no runs under .*precision; make them with `dvc repro precision`"):
        precision.SPEC.render(Context(runs_root=tmp_path / "runs", out=tmp_path))
    precision_runs(tmp_path / "runs")
    items = build(tmp_path / "runs", tmp_path / "reports", [width_one.SPEC, precision.SPEC])
    assert isinstance(items[0], Skipped) and isinstance(items[1], Rendered)
    assert "9 GAL run(s) predate h's statistics" in items[0].missing and items[0].make == "dvc repro train_regression"
    regression_runs(tmp_path / "runs2")
    precision_runs(tmp_path / "runs2")
    items = build(tmp_path / "runs2", tmp_path / "reports", [width_one.SPEC, precision.SPEC])
    assert all(isinstance(item, Rendered) for item in items)
    index = (tmp_path / "reports" / "index.md").read_text()
    assert "## Table V at d = 1" in index and "## Precision study" in index
    assert (tmp_path / "reports" / "tables" / "precision.csv").is_file()
    claims = (tmp_path / "reports" / "tables" / "claims.md").read_text()  # the study's note under the claims
    assert "Precision study (profile smoke; " in claims and "GAL's remainder is below float32's resolution" in claims
    prov = json.loads((tmp_path / "reports" / "provenance.json").read_text())
    assert prov["numbers"]["Precision study/Boston/sign_agreement"]["dvc_repro"] == ["precision"]
