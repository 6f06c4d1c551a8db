"""The Fig. 4 toy pipeline: paths, the ratio-0 identity, the CLI's outputs and errors, determinism."""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipelines import toy3d
from pipelines.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.toy3d", *args], cwd=ROOT, env=dict(os.environ),
                          capture_output=True, text=True, timeout=120)


def test_surface_at_paper_start():
    x, y = 0.75, 1.0
    expected = -math.sin(x**2) * math.cos(3 * y**2) * math.exp(-((x * y) ** 2)) - math.exp(-((x + y) ** 2))
    import torch

    assert toy3d.surface(torch.tensor([x, y], dtype=torch.float64)).item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("gal", [False, True])
def test_gd_paths_from_paper_start_are_finite(gal):
    cfg = toy3d.load_config(["optimizers=[gd]"])
    run = cfg.runs["gd"]
    assert (cfg.start, run.lr, run.steps, run.ratio) == ([0.75, 1.0], 0.1, 100, 0.2)
    rows = toy3d.run_path(cfg, run, gal=gal)
    assert [r["step"] for r in rows] == list(range(101))
    assert (rows[0]["x"], rows[0]["y"]) == (0.75, 1.0)
    assert all(math.isfinite(r[k]) for r in rows for k in ("x", "y", "z"))
    assert rows[-1]["z"] < rows[0]["z"]  # it descends
    if gal:
        assert all(r["accepted"] in (0, 1) and math.isfinite(r["remainder"]) for r in rows[1:])
        assert any(r["accepted"] for r in rows[1:])
    else:
        assert all(r["accepted"] == "" and r["remainder"] == "" for r in rows)


@pytest.mark.parametrize("name", ["gd", "lookahead", "rmsprop", "adam", "adabound"])
def test_gal_with_ratio_zero_is_the_baseline(name):
    cfg = toy3d.load_config([f"runs.{name}.steps=40", f"runs.{name}.ratio=0"])
    run = cfg.runs[name]
    xyz = lambda rows: [(r["x"], r["y"], r["z"]) for r in rows]  # noqa: E731
    assert xyz(toy3d.run_path(cfg, run, gal=True)) == xyz(toy3d.run_path(cfg, run, gal=False))


def test_a_runs_seed_and_the_init_set_h_and_nothing_else():
    cfg = toy3d.load_config(["runs.gd.steps=20"])
    again = toy3d.load_config(["runs.gd.steps=20"])
    first = toy3d.run_path(cfg, cfg.runs["gd"], gal=True)
    assert toy3d.run_path(again, again.runs["gd"], gal=True) == first
    for change in ("runs.gd.seed=1", "h_init=default"):
        other = toy3d.load_config(["runs.gd.steps=20", change])
        assert toy3d.run_path(other, other.runs["gd"], gal=True) != first
        assert toy3d.run_path(other, other.runs["gd"], gal=False) == toy3d.run_path(cfg, cfg.runs["gd"], gal=False)


def test_h_starts_xavier_uniform_with_zero_biases_as_the_authors_toy():
    cfg = toy3d.load_config([])
    torch.manual_seed(cfg.runs["gd"].seed)
    layers = [m for m in toy3d.adjuster(cfg, cfg.runs["gd"]).net.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in layers] == [(2, 64), (64, 24), (24, 2)]
    for m in layers:  # Xavier-uniform's bound: sqrt(6 / (fan_in + fan_out))
        assert m.weight.abs().max() <= math.sqrt(6 / (m.in_features + m.out_features))
        assert m.bias is None or not m.bias.any()
    with pytest.raises(ConfigError, match="h_init='he'"):
        toy3d.load_config(["h_init=he"])


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tmp_path


def history(run_dir: Path) -> list[dict]:
    with open(run_dir / "history.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_same_seed_gives_identical_histories(mlflow_store, capsys):
    args = ["optimizers=[gd,adam]", "runs.gd.steps=10", "runs.adam.steps=10"]
    assert toy3d.main([*args, f"runs_root={mlflow_store / 'a'}"]) == 0
    assert toy3d.main([*args, f"runs_root={mlflow_store / 'b'}"]) == 0
    for run in ("gd-baseline", "gd-gal", "adam-baseline", "adam-gal"):
        first = (mlflow_store / "a" / "toy3d" / run / "history.csv").read_bytes()
        assert first == (mlflow_store / "b" / "toy3d" / run / "history.csv").read_bytes()
    assert len(capsys.readouterr().out.splitlines()) == 2 * 2  # one summary line per optimiser, twice


def test_cli_records_one_tracked_run_per_optimizer_and_method(mlflow_store):
    root = mlflow_store / "nested"
    result = cli("optimizers=[gd,adam]", "runs.gd.steps=5", "runs.adam.steps=7", f"runs_root={root}")
    assert result.returncode == 0, result.stderr
    runs = root / "toy3d"
    assert sorted(p.name for p in runs.iterdir()) == ["adam-baseline", "adam-gal", "gd-baseline", "gd-gal"]
    for run, steps in (("gd-baseline", 5), ("gd-gal", 5), ("adam-baseline", 7), ("adam-gal", 7)):
        rows = history(runs / run)
        assert [int(r["step"]) for r in rows] == list(range(steps + 1))
        assert (float(rows[0]["x"]), float(rows[0]["y"])) == (0.75, 1.0)
        assert json.loads((runs / run / "metrics.json").read_text())["final_z"] == pytest.approx(float(rows[-1]["z"]))
        assert json.loads((runs / run / "run.json").read_text())["task"] == "toy3d"
    assert all(r["accepted"] in ("0", "1") for r in history(runs / "gd-gal")[1:])
    summary = [line for line in result.stdout.splitlines() if "final z" in line]
    assert len(summary) == 2 and "GD" in summary[0] and "Adam" in summary[1]


@pytest.mark.parametrize("override", [
    "foo=1",                          # unknown key
    "optimizers=[gd,nadam]",          # unknown optimiser run
    "runs.gd.optimizer=nadam",        # unknown optimiser name
    "runs.gd.lr=fast",                # wrong type
    "runs.gd.ratio=-1",               # out of range (the library's check)
    "runs.gd.kwargs.momentom=0.9",    # an argument the optimiser does not take
    "steps",                          # not key=value
])
def test_bad_override_one_line_exit_2_no_files(override, tmp_path, capsys):
    out = tmp_path / "out"
    assert toy3d.main(["optimizers=[gd]", override, f"runs_root={out}"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert len(captured.err.strip().splitlines()) == 1 and captured.err.startswith("toy3d: bad config:")
    assert not out.exists()


def test_bad_override_from_the_command_line(tmp_path):
    out = tmp_path / "out"
    result = cli("optimizers=[gd,nadam]", f"runs_root={out}")
    assert result.returncode == 2
    assert result.stdout == "" and len(result.stderr.strip().splitlines()) == 1  # no traceback
    assert "nadam" in result.stderr
    assert not out.exists()
