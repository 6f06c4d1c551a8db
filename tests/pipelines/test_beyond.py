"""The "Beyond the paper" study (ours): its grids name their runs, the Digits data and task, GAL's variants in
the pipeline (h learns at d = 1), Holm's correction, and the report's table and verdict."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import yaml
from omegaconf import OmegaConf
from scipy import stats as scipy_stats

from pipelines import profile, toy3d
from pipelines.errors import ConfigError
from pipelines.prepare import digits as D
from pipelines.report import stats
from pipelines.report.model import Context
from pipelines.report.records import MissingRuns
from pipelines.report.specs import beyond
from pipelines.tasks.digits import task as digits_task
from pipelines.tasks.regression import task as regression
from pipelines.training import identity
from tests.pipelines.prepare_helpers import ROOT, files_under, prepare_cli, prepare_config
from tests.pipelines.report_fixtures import make_runs
from tests.pipelines.train_helpers import name_of, train_config

PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
GRIDS = PARAMS["beyond_grids"]
GRID_PROFILE = {"smoke": "smoke", "regression": "regression"}


def variant(*overrides: str) -> str:
    return identity.variant(train_config(*overrides))


@pytest.mark.parametrize("grid", sorted(GRIDS))
def test_every_arm_and_test_bed_names_its_runs_as_the_stages_spell_them(grid):
    spec, arms = GRIDS[grid], PARAMS["beyond_arms"]
    assert [a["method"] for a in arms] == ["baseline", "gal", "gal", "gal"] and len(spec["seeds"]) >= 2
    assert spec["seeds"] == list(range(spec["seed_count"]))  # the toy's seeds, given as a count
    assert toy3d.load_config(["study=beyond", f"seeds={spec['seed_count']}", f"optimizers={spec['toy3d']}"])
    for arm in arms:
        assert "study=beyond" in arm["overrides"].split()  # never a run of Table V's or the protocol study's
        base = [f"profile={GRID_PROFILE[grid]}", *arm["overrides"].split()]
        for ds in spec["datasets"]:
            assert variant(f"experiment={ds}_{arm['method']}", *base) == arm["token"]
        for bed in spec["closest"]:
            got = variant(f"experiment={bed['dataset']}_{arm['method']}", *base, *bed["overrides"].split())
            assert got == f"{arm['token']}-{bed['suffix']}", (bed, arm)
        for model in spec["digits"]:
            assert variant(f"experiment=digits_{model}_{arm['method']}", *base) == arm["token"]
    # the closest beds are protocol-study points: the same overrides under the same name
    points = {p["variant"]: p["overrides"] for p in PARAMS["protocol_grids"]["regression"]["points"]}
    assert all(points[bed["suffix"]] == bed["overrides"] for bed in spec["closest"])


def test_the_profile_switch_picks_the_grid():
    text = (ROOT / "params.yaml").read_text()
    assert yaml.safe_load(profile.switched(text, "regression"))["beyond"] == GRIDS["regression"]
    assert yaml.safe_load(profile.switched(text, "smoke"))["beyond"] == GRIDS["smoke"]


def test_the_prepared_digits_are_the_real_set_split_by_class(tmp_path):
    proc = prepare_cli("pipelines.prepare.digits", tmp_path, "data=digits", "profile=smoke")
    assert proc.returncode == 0, proc.stderr
    with np.load(tmp_path / "data" / "processed" / "digits.npz") as z:
        X_train, y_train, X_test, y_test = (z[k] for k in ("X_train", "y_train", "X_test", "y_test"))
    assert X_train.shape == (1347, 64) and X_test.shape == (450, 64) and X_train.max() == 16
    for label in range(10):  # stratified: a quarter of each class held out
        total = np.sum(y_train == label) + np.sum(y_test == label)
        assert np.sum(y_test == label) == round(0.25 * total)
    record = json.loads((tmp_path / "data" / "processed" / "digits.json").read_text())
    assert record["train"] == 1347 and record["test"] == 450 and record["identity"]["stage"] == "prepare_digits"
    assert files_under(tmp_path) == {"data/raw/digits/digits.csv.gz", "data/processed/digits.npz",
                                     "data/processed/digits.json", "data/processed/digits.manifest.tsv"}


@pytest.mark.parametrize("override, says", [
    ("data.source.content_sha256=00", "content checksum mismatch"),
    ("data.split.seed=1", "drew other test images"),
    ("data.split.test_fraction=1.5", "data.split.test_fraction=1.5"),
])
def test_a_bad_digits_stage_says_why_in_one_line_and_leaves_nothing(tmp_path, override, says):
    proc = prepare_cli("pipelines.prepare.digits", tmp_path, "data=digits", "profile=smoke", override)
    assert proc.returncode == 2 and says in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert files_under(tmp_path) == set()


def test_the_split_is_drawn_from_its_seed_alone():
    y = np.repeat(np.arange(3), 8)
    first = D.stratified_split(y, 0.25, 0)
    assert np.array_equal(first, D.stratified_split(y, 0.25, 0)) and len(first) == 6
    assert not np.array_equal(first, D.stratified_split(y, 0.25, 1))


@pytest.mark.parametrize("model, widths", [("digits_mlp", [64]), ("digits_cnn", [16, 32]), ("digits_cnn", [])])
def test_the_digits_models_map_8x8_images_to_10_logits(model, widths):
    net = digits_task.build_model(OmegaConf.create({"name": model, "widths": widths}), 10)
    assert net(torch.rand(5, 64)).shape == (5, 10)


def test_digits_trains_with_every_proposal_and_h_learns(tracked_root):
    assert D.run(prepare_config(tracked_root, "data=digits", "profile=smoke")) == 0
    moved = {}
    for proposal in ("row", "batch", "bounded"):
        overrides = (f"root={tracked_root}", "experiment=digits_mlp_gal", "task.epochs=1",
                     f"method.proposal={proposal}", "study=beyond")
        digits_task.run(train_config(*overrides))
        run = tracked_root / "runs" / "digits" / name_of(*overrides)
        metrics = json.loads((run / "metrics.json").read_text())
        assert 0 <= metrics["test_error"] < 90 and metrics["test_loss"] > 0
        row = (run / "history.csv").read_text().splitlines()
        moved[proposal] = float(dict(zip(row[0].split(","), row[-1].split(",")))["adjuster_move_rel"])
    assert all(value > 0 for value in moved.values()), moved  # d = 10: h learns under every proposal


def test_at_width_one_the_variants_give_h_gradients_where_the_published_step_gives_none(boston_root):
    grads = {}
    for proposal in ("row", "batch", "bounded"):
        overrides = (f"root={boston_root}", "experiment=boston_gal", "task.epochs=2", f"method.proposal={proposal}")
        regression.run(train_config(*overrides))
        rows = (boston_root / "runs" / "regression" / name_of(*overrides) / "history.csv").read_text().splitlines()
        grads[proposal] = float(dict(zip(rows[0].split(","), rows[-1].split(",")))["adjuster_grad_norm"])
    assert grads["row"] == 0 and grads["batch"] > 0 and grads["bounded"] > 0, grads


def test_the_toy_runs_every_arm_per_seed_and_only_gals_h_depends_on_the_seed(tracked_root):
    cfg = toy3d.load_config(["study=beyond", "seeds=2", "optimizers=[gd]", "runs.gd.steps=15",
                             f"runs_root={tracked_root / 'runs'}"])
    toy3d.train_all(cfg)
    folder = tracked_root / "runs" / "toy3d_beyond"
    arms = ("baseline-beyond", "gal-beyond", "gal-prop-batch-beyond", "gal-prop-bounded-beyond")
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"gd-{a}-s{s}" for a in arms for s in range(2))
    final = {p.name: json.loads((p / "metrics.json").read_text()) for p in folder.iterdir()}
    assert final["gd-baseline-beyond-s0"] == final["gd-baseline-beyond-s1"]  # no h: the same path every seed
    assert final["gd-gal-prop-bounded-beyond-s0"]["path_mean_z"] != final["gd-gal-prop-bounded-beyond-s1"]["path_mean_z"]
    # one point is one row: "batch" is "row" up to float rounding (the paper's map is fused, the variants' are not)
    assert final["gd-gal-beyond-s0"] == pytest.approx(final["gd-gal-prop-batch-beyond-s0"], rel=1e-5)
    assert all(final[f"gd-gal-beyond-s{s}"]["adjuster_move_rel"] > 0 for s in range(2))
    with pytest.raises(ConfigError, match="study=beyond with seeds >= 1"):
        toy3d.load_config(["seeds=2"])


def test_holm_adjusts_each_p_within_its_family():
    rng = np.random.default_rng(0)
    pairs = [[rng.normal(0, 1, 8), rng.normal(shift, 1, 8)] for shift in (0.0, 3.0, 1.2)]
    raw = [scipy_stats.ttest_ind(a, b).pvalue for a, b in pairs]
    order = np.argsort(raw)
    expected = np.maximum.accumulate(np.minimum(1, (3 - np.arange(3)) * np.array(raw)[order]))
    for k in range(3):
        family = [g for pair in [pairs[k], *(p for i, p in enumerate(pairs) if i != k)] for g in pair]
        assert math.isclose(stats.compute("p_holm", family), expected[list(order).index(k)], rel_tol=1e-12)
    with pytest.raises(ValueError):
        stats.compute("p_holm", [pairs[0][0]])


def test_the_report_tests_every_arm_and_names_the_better_one(tmp_path):
    make_runs(tmp_path / "runs")
    ctx = Context(tmp_path / "runs", tmp_path / "out")
    rendered = beyond.SPEC.render(ctx)
    rows = {(r[0], r[1]): r for r in rendered.layout.rows}
    assert set(rows) == {(bed, arm) for bed in ("Boston, our protocol", "Digits, MLP") for arm in beyond.ARMS.values()}
    bounded = rows[("Boston, our protocol", "GAL, bounded")]
    assert bounded[2] == "3" and bounded[4].startswith("t ") and "Holm" in bounded[4]
    holm = next(n for n in rendered.numbers if n.key.endswith("GAL, bounded vs Baseline/test_mae/p_holm"))
    assert holm.value < 0.05 and holm.op == "p_holm" and len(holm.groups) == 10  # the pair, then the family
    assert "better than the baseline (Holm p < 0.05) on Boston, our protocol" in rendered.layout.notes[-1]
    assert "GAL, batch: better than the baseline (Holm p < 0.05) on no test bed" in rendered.layout.notes[-1]


def test_a_bed_missing_an_arm_skips_the_study_and_says_what_to_run(tmp_path):
    make_runs(tmp_path / "runs", skip=tuple(f"digits_mlp-gal-prop-batch-beyond-s{s}" for s in range(3)))
    with pytest.raises(MissingRuns) as err:
        beyond.SPEC.render(Context(tmp_path / "runs", tmp_path / "out"))
    assert "Digits, MLP/GAL, batch seed=0,1,2" in str(err.value.missing) and "beyond_digits" in err.value.make
