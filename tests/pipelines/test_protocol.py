"""The protocol study: its grids in params.yaml expand into the runs the stages write (every point's
variant is the one run identity gives its overrides, on every dataset, in both grids), the closest-protocol
selection, and the report's study table, figure and claims on synthetic run records."""
from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import stats

from pipelines.report import __main__ as report_cli
from pipelines.report.specs import protocol
from pipelines.training import identity
from tests.pipelines.prepare_helpers import ROOT
from tests.pipelines.report_fixtures import write_run
from tests.pipelines.train_helpers import train_config

PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
GRIDS = PARAMS["protocol_grids"]
# What the study may change: the protocol choices the paper leaves open (conf/task/regression.yaml, optim/adam,
# data/<set>.yaml's batch) and GAL's eps
PROTOCOL_KEYS = {"task.scale_features", "task.scale_target", "task.epochs", "optim.lr", "data.train.batch_size"}
GRID_PROFILE = {"smoke": "smoke", "regression": "regression"}


def run_variant(overrides: list[str]) -> str:
    return identity.variant(train_config(*overrides))


@pytest.mark.parametrize("grid", sorted(GRIDS))
def test_every_grid_point_names_its_runs_on_every_dataset(grid):
    spec = GRIDS[grid]
    points = spec["points"]
    assert len({p["variant"] for p in points}) == len(points), "two points would write the same runs"
    for point in points:
        keys = {o.split("=")[0] for o in point["overrides"].split()}
        assert keys <= PROTOCOL_KEYS, f"{point}: not a protocol choice: {keys - PROTOCOL_KEYS}"
        assert keys <= protocol.STUDY_KEYS, f"the report would not find {point['variant']}"
        for ds in spec["datasets"]:
            for method in ("baseline", "gal"):
                got = run_variant([f"experiment={ds}_{method}", f"profile={GRID_PROFILE[grid]}",
                                   *point["overrides"].split()])
                # "" would be our own protocol: train_regression's runs, which the point would overwrite
                assert got == point["variant"] != "", (grid, ds, method, point)
    for eps in spec["eps"]:
        for ds in spec["datasets"]:
            got = run_variant([f"experiment={ds}_gal", f"profile={GRID_PROFILE[grid]}", f"method.ratio={eps}"])
            assert got == f"eps{eps}" and "method.ratio" in protocol.STUDY_KEYS, (grid, ds, eps, got)
    assert set(spec["datasets"]) <= set(PARAMS["regression_datasets"]) and len(spec["seeds"]) >= 2


def test_the_expanded_grid_is_one_of_the_named_grids():
    assert PARAMS["protocols"] in list(GRIDS.values())
    assert PARAMS["protocols"] == GRIDS["smoke"] or PARAMS["profile"] != "smoke"
    smoke = GRIDS["smoke"]  # the e2e runs it: it must stay a handful of runs
    assert len(smoke["datasets"]) * len(smoke["seeds"]) * (2 * len(smoke["points"]) + len(smoke["eps"])) <= 8


def test_distance_is_the_rms_of_z_scores_against_the_paper():
    paper = {"MAE": {"mean": 4.0, "std": 0.5}, "MSE": {"mean": 20.0, "std": 4.0}, "R2": {"mean": 0.8, "std": 0.1}}
    ours = {"MAE": 3.0, "MSE": 24.0, "R2": 0.8}
    assert protocol.distance(ours, paper) == pytest.approx(math.sqrt((4 + 1 + 0) / 3))
    assert protocol.distance(paper_means := {k: v["mean"] for k, v in paper.items()}, paper) == 0
    assert math.isnan(protocol.distance(ours, {**paper, "R2": {"mean": 0.8, "std": None}}))
    assert math.isnan(protocol.distance({**paper_means, "MAE": math.nan}, paper))


def test_closest_takes_the_smallest_finite_distance_and_the_first_on_a_tie():
    assert protocol.closest({"ours": 3.0, "epochs10": 0.5, "lr0.01": 1.0}) == "epochs10"
    assert protocol.closest({"ours": 1.0, "epochs10": 1.0}) == "ours"
    assert protocol.closest({"ours": math.nan, "lr0.01": 2.0}) == "lr0.01"
    assert protocol.closest({"ours": math.nan}) is None and protocol.closest({}) is None


# ---- the report on synthetic records ---------------------------------------------------------------------
SEEDS = (0, 1, 2)
PAPER_BOSTON = {"test_mae": 3.9535, "test_mse": 23.0956, "test_r2": 0.7668}
# (dataset, variant) -> (baseline metrics or None: GAL only, GAL's offset on each metric, acceptance)
CENTRES = {
    ("boston", ""): ({"test_mae": 2.2, "test_mse": 9.0, "test_r2": 0.88}, 0.0, 0.9),
    # close to the paper's baseline, and GAL clearly better there
    ("boston", "epochs10-scale_features-false-scale_target-false"): (PAPER_BOSTON, -1.0, 0.7),
    ("boston", "lr0.01"): ({"test_mae": 3.0, "test_mse": 15.0, "test_r2": 0.8}, 0.0, 0.8),
    ("boston", "eps1"): (None, 0.5, 0.2),
    ("diabetes", ""): ({"test_mae": 44.0, "test_mse": 3000.0, "test_r2": 0.45}, 0.0, 0.9),
    ("california", ""): ({"test_mae": 0.35, "test_mse": 0.27, "test_r2": 0.8}, 0.0, 0.9),
}


def synthetic(ds: str, variant: str, method: str, seed: int) -> tuple[dict, list[dict]]:
    base, offset, acc = CENTRES[(ds, variant)]
    base = base or CENTRES[(ds, "")][0]
    jitter = 0.01 * (seed - 1)
    metrics = {k: v * (1 + jitter) for k, v in base.items()}
    if method == "gal":  # offset in units of 10% of the value: lower errors and higher R² when negative
        metrics = {k: v * (1 + 0.1 * offset * (-1 if k == "test_r2" else 1)) for k, v in metrics.items()}
    history = [{"epoch": e, "train_loss": 1.0 / e, "test_mae": metrics["test_mae"] * (1 + 1 / e),
                **({"accepted": acc, "adjuster_grad_norm": 1e-9 * e, "adjuster_move": 0.0, "adjuster_move_rel": 0.0}
                   if method == "gal" else {})} for e in (1, 2, 3)]
    history[-1]["test_mae"] = metrics["test_mae"]
    return metrics, history


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("protocol")
    old = os.getcwd()
    os.chdir(root)
    try:
        for (ds, variant), (base, _, _) in CENTRES.items():
            for method in ("baseline", "gal") if base is not None or not variant else ("gal",):
                for seed in SEEDS:
                    name = "-".join([ds, method, *([variant] if variant else []), f"s{seed}"])
                    metrics, history = synthetic(ds, variant, method, seed)
                    config = {"task": {"name": "regression", "epochs": 10 if "epochs10" in variant else 200},
                              "data": {"name": ds}, "method": {"name": method, **(
                                  {"ratio": 1.0 if variant == "eps1" else 0.01} if method == "gal" else {})},
                              "optim": {"lr": 0.01 if variant == "lr0.01" else 0.001}, "seed": seed}
                    stage = "train_regression" if not variant else "protocol_eps" if "eps" in variant else "protocol"
                    write_run(Path("runs"), "regression", name, config, metrics, history, f"id-{name}",
                              f"{stage}@{name}", "regression", {"variant": variant})
        assert report_cli.main(["--runs", "runs", "--out", "reports"]) == 0
    finally:
        os.chdir(old)
    return root / "reports"


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def values(ds: str, variant: str, method: str, metric: str) -> np.ndarray:
    return np.array([synthetic(ds, variant, method, s)[0][metric] for s in SEEDS])


CLOSE = "epochs10-scale_features-false-scale_target-false"


def test_study_table_names_the_closest_protocol_and_tests_gal_there(site):
    md = (site / "tables/protocol_study.md").read_text()
    assert f"{CLOSE} **closest to the paper's baseline**" in md
    assert "Boston: " + CLOSE in md and "no study runs for Diabetes, California" in md
    assert "eps1 (GAL only; baseline: ours)" in md
    assert "‖∇h‖ 3.00e-09, ‖Δh‖ 0.00e+00" in md and "only acceptance is shown" not in md
    rows = {r["key"]: float(r["value"]) for r in read_csv(site / "tables/protocol_study.csv")}
    key = f"Protocol study/Boston/{CLOSE}"
    assert rows[f"{key}/Baseline/MAE/mean"] == pytest.approx(values("boston", CLOSE, "baseline", "test_mae").mean())
    expected = stats.ttest_ind(values("boston", CLOSE, "baseline", "test_mse"),
                               values("boston", CLOSE, "gal", "test_mse"))
    assert rows[f"{key}/t-test/MSE/t"] == pytest.approx(expected.statistic)
    assert rows[f"{key}/t-test/MSE/p"] == pytest.approx(expected.pvalue)
    # a GAL-only protocol is tested against our protocol's baseline runs
    expected = stats.ttest_ind(values("boston", "", "baseline", "test_mae"),
                               values("boston", "eps1", "gal", "test_mae"))
    assert rows["Protocol study/Boston/eps1/t-test/MAE/t"] == pytest.approx(expected.statistic)
    assert rows["Protocol study/Boston/eps1/GAL/accepted/mean"] == pytest.approx(0.2)


def test_claims_show_each_table5_claim_under_the_closest_protocol(site):
    claims = {(r["subject"], r["metric"]): r for r in read_csv(site / "tables/claims.csv") if r["table"] == "Table V"}
    assert len(claims) == 9
    boston = claims[("Boston", "MAE")]
    assert boston["verdict"] == "not reproduced"  # ours: GAL equal to the baseline, no better
    assert (boston["closest_protocol"], boston["closest_verdict"]) == (CLOSE, "reproduced")
    assert float(boston["closest_p"]) < 0.05
    assert claims[("Diabetes", "MAE")]["closest_protocol"] == ""  # no study runs there
    md = (site / "tables/claims.md").read_text()
    assert "under the regression protocol closest to the paper's baselines: 3 reproduced" in md
    prov = json.loads((site / "provenance.json").read_text())["numbers"]
    for key in boston["closest_provenance_keys"].split("; "):
        assert "tables/claims.md" in prov[key]["files"]
        assert prov[key]["dvc_repro"][0].startswith("protocol@boston-")


def test_curves_figure_and_its_numbers(site):
    for ext in ("png", "pdf", "csv"):
        assert (site / f"figures/protocol_curves.{ext}").stat().st_size > 0
    rows = {r["key"]: float(r["value"]) for r in read_csv(site / "figures/protocol_curves.csv")}
    assert rows[f"Protocol curves/Boston/{CLOSE}/GAL/test_mae/mean"] == pytest.approx(
        values("boston", CLOSE, "gal", "test_mae").mean())
    assert "Protocol curves/Boston/ours/Baseline/test_mae/mean" in rows
    assert "Protocol curves/Boston/lr0.01/Baseline/test_mae/mean" not in rows  # neither ours nor the closest
    index = (site / "index.md").read_text()
    assert "## Protocol study" in index and "figures/protocol_curves.png" in index


def test_a_recheck_without_its_table_stands_alone_without_a_verdict_of_ours():
    from pipelines.report import claims

    recheck = claims.UnderProtocol(
        table="Table V", subject="Boston", metric="MAE", better="lower",
        paper={"baseline": 3.95, "gal": 2.81, "t": 5.02, "p": 1.02e-3},
        ours={"baseline": 3.5, "gal": 3.0, "t": 4.0, "p": 0.004}, keys=["k/t"], protocol="epochs10", distance=0.5)
    layout = claims.layout([recheck])
    assert len(layout.rows) == 1 and layout.rows[0][-2:] == [
        "epochs10 (distance 0.50): 3.5000 → 3.0000 (t 4.00, p 4.00e-03)", "reproduced"]
    assert layout.rows[0][-3] == "too few runs"  # Table V itself was not rendered
    assert "1 too few runs" in layout.caption and "closest to the paper's baselines: 1 reproduced" in layout.caption
    (row,) = csv.DictReader(claims.to_csv([recheck]).splitlines())
    assert (row["verdict"], row["closest_verdict"], row["closest_protocol"]) == \
        ("too few runs", "reproduced", "epochs10")
