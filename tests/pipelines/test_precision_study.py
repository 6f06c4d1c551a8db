"""The precision stage and the float64 option as the pipeline exposes it (method.compute_dtype)."""
from __future__ import annotations

import csv
import json
import math
import re

import pytest
import torch
import yaml

from pipelines import precision
from pipelines.errors import ConfigError
from pipelines.training.method import adjuster_movement, adjuster_snapshot, build_adjuster

SETTINGS = "settings=[imagenet_resnet50,cifar10_sgd,coco_detr_r50,boston]"


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    root = tmp_path_factory.mktemp("precision")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        assert precision.main([SETTINGS, "profile=smoke", f"runs_root={root / 'runs'}"]) == 0
    return root / "runs" / "precision"


def load(records, setting):
    folder = records / setting
    with open(folder / "history.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    config = yaml.safe_load((folder / "config.yaml").read_text())
    return config, json.loads((folder / "metrics.json").read_text()), rows


def test_each_setting_takes_its_presets_hyper_parameters_and_shapes(records):
    config, metrics, rows = load(records, "imagenet_resnet50")
    assert config["gal"] == {"lr": 0.016, "ratio": 0.001, "scale": 0.001, "arch": [512, 128],
                             "remainder": "reference", "policy": "safeguard"}
    assert config["output"]["rows"] == 800 and config["output"]["dim"] == 1000  # global batch x classes
    levels = config["output"]["levels"]
    assert len(rows) == len(levels) == metrics["draws"]  # smoke: one draw per level
    for row, level in zip(rows, levels):  # the drawn logits sit at the requested loss level
        assert float(row["loss"]) == pytest.approx(level, rel=1e-3)
    config, _, _ = load(records, "coco_detr_r50")
    assert config["output"]["dim"] == 4 and config["output"]["rows"] == round(8 * 7.3)
    assert config["gal"]["lr"] == 1e-4 and config["gal"]["ratio"] == 0.01
    config, _, _ = load(records, "boston")
    assert config["output"]["dim"] == 1 and config["gal"]["arch"] == [16, 4]


def test_metrics_summarise_the_trials(records):
    for setting in ("imagenet_resnet50", "cifar10_sgd", "coco_detr_r50", "boston"):
        _, metrics, rows = load(records, setting)
        column = lambda key: [float(r[key]) for r in rows]  # noqa: E731
        signs = [math.copysign(1, a) == math.copysign(1, b)
                 for a, b in zip(column("remainder_float32"), column("remainder_float64"))]
        assert metrics["sign_agreement"] == pytest.approx(sum(signs) / len(rows))
        assert metrics["tie_fraction_float32"] == pytest.approx(sum(column("tie_float32")) / len(rows))
        ulps = sorted(column("remainder_ulps"))
        assert metrics["median_remainder_ulps"] == pytest.approx(ulps[len(ulps) // 2], rel=1e-6)
        assert metrics["rounding"] == float(metrics["median_remainder_ulps"] < 1)


def test_imagenet_setting_is_below_float32_resolution_and_cifar_is_not(records):
    _, imagenet, _ = load(records, "imagenet_resnet50")
    _, cifar, _ = load(records, "cifar10_sgd")
    # lr s = 1.6e-5: |R| ~ 1e-8 beside L ~ 3-7, where float32's spacing is ~5e-7: the trial loss ties
    assert imagenet["rounding"] == 1.0 and imagenet["tie_fraction_float32"] == 1.0
    assert imagenet["median_remainder"] < 1e-7 and imagenet["sign_agreement"] < 0.5
    assert cifar["rounding"] == 0.0 and cifar["sign_agreement"] == 1.0 and cifar["decision_agreement"] == 1.0


@pytest.mark.parametrize("args, message", [
    (["settings=[imagenet_resnet51]"], "setting 'imagenet_resnet51': no preset conf/experiment/imagenet_resnet51_gal"),
    (["settings=[]"], "settings is empty"),
    (["trials=0"], "trials=0, smoke_trials=1: use integers of at least 1"),
    (["regression.residual_std=[0]"], r"regression.residual_std=\[0.0\]: use a non-empty list of positive numbers"),
    (["classification.logit_std=wide"], "Value 'wide' of type 'str' could not be converted to Float"),
    (["nonsense=1"], "Key 'nonsense' not in 'PrecisionConf'"),
    (["settings"], "expected key=value overrides"),
])
def test_bad_settings_are_one_line_before_any_compute(tmp_path, capsys, args, message):
    assert precision.main([*args, f"runs_root={tmp_path / 'runs'}"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and re.search(message, err), err
    assert not (tmp_path / "runs").exists()


def test_method_compute_dtype_builds_the_float64_step_or_is_refused():
    method = {"gal": True, "arch": [4], "ratio": 0.01, "scale": 1.0}
    assert build_adjuster({**method, "compute_dtype": "float64"}, 3).compute_dtype == torch.float64
    assert build_adjuster(method, 3).compute_dtype == torch.float32  # the authors' arithmetic by default
    for bad, shown in (("float16", "'float16'"), ([64], r"\[64\]")):
        with pytest.raises(ConfigError, match=rf"^method.compute_dtype={shown}: use float32 or float64$"):
            build_adjuster({**method, "compute_dtype": bad}, 3)


def test_adjuster_movement_is_the_norm_of_the_change():
    adjuster = build_adjuster({"gal": True, "arch": [4], "ratio": 0.01, "scale": 1.0}, 3)
    start = adjuster_snapshot(adjuster)
    assert adjuster_movement(adjuster, start) == {"adjuster_move": 0.0, "adjuster_move_rel": 0.0}
    with torch.no_grad():
        adjuster.net.layers[0].weight[0, 0] += 0.5
    moved = adjuster_movement(adjuster, start)
    assert moved["adjuster_move"] == pytest.approx(0.5)
    assert moved["adjuster_move_rel"] == pytest.approx(0.5 / start.norm().item())
    noise = build_adjuster({"gal": True, "ratio": 0.01, "scale": 1.0, "source": "uniform"}, 3)
    assert adjuster_movement(noise, adjuster_snapshot(noise)) == {"adjuster_move": 0.0, "adjuster_move_rel": 0.0}


def test_the_study_says_how_far_it_is(records, tmp_path, capsys, monkeypatch):
    """A line as a setting starts, one a PROGRESS_INTERVAL_S at most while its draws run (here each draw takes a
    fake 61 s), and its result."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{records.parent.parent / 'mlflow.db'}")  # made already
    now = [0.0]
    monkeypatch.setattr(precision, "clock", lambda: now[0])
    real_trial = precision.trial

    def slow_trial(*args):
        now[0] += 61.0
        return real_trial(*args)

    monkeypatch.setattr(precision, "trial", slow_trial)
    assert precision.main(["settings=[boston]", "profile=smoke", f"runs_root={tmp_path / 'runs'}"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:3] == ["[1/1] boston: 3 draws of 32 x 1 outputs (residual std 1, 0.5, 0.3)",
                         "[1/1] boston: 1/3 draws", "[1/1] boston: 2/3 draws"]
    assert lines[3].startswith("[1/1] boston: sign of R agrees") and lines[3].endswith("3 draws)")
    assert len(lines) == 4
