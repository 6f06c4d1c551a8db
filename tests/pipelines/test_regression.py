"""The regression task on the shared runner: deterministic runs, a split shared by baseline and GAL, one run
directory per variant, kill-and-resume into the same MLflow run, and bad inputs refused in one line."""
import json

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipelines.errors import ConfigError, UserError
from pipelines.errors import RunError
from pipelines.tasks.regression import task as regression
from tests.pipelines.train_helpers import (checkpoint_path, kill_at_first_checkpoint, train, train_config, train_env,
                                           write_boston)

EXPERIMENT = "experiment=boston_gal"


def config(root, *overrides, experiment="boston_gal"):
    return train_config(f"root={root}", f"experiment={experiment}", "task.epochs=3", *overrides)


def record(root, name):
    run = root / "runs" / "regression" / name
    return json.loads((run / "metrics.json").read_text()), (run / "history.csv").read_text()


def test_same_seed_gives_identical_metrics_twice(boston_root):
    regression.run(config(boston_root, "seed=1"))
    first = record(boston_root, "boston-gal-epochs3-s1")
    regression.run(config(boston_root, "seed=1"))
    assert record(boston_root, "boston-gal-epochs3-s1") == first
    regression.run(config(boston_root, "seed=2"))
    assert record(boston_root, "boston-gal-epochs3-s2")[0] != first[0]


def test_a_compiled_gal_step_is_the_same_run_within_rounding(boston_root):
    """trainer.compile=true: GAL's step through torch.compile; the run keeps its name, records what ran, and its
    numbers are the eager run's within float32 rounding."""
    compiled_root = boston_root / "compiled"
    write_boston(compiled_root)
    regression.run(config(boston_root))
    regression.run(config(compiled_root, "trainer.compile=true"))
    (eager, eager_history), (compiled, compiled_history) = (record(root, "boston-gal-epochs3-s0")
                                                            for root in (boston_root, compiled_root))
    assert compiled == pytest.approx(eager, rel=1e-5)
    (columns, *eager_rows), (_, *compiled_rows) = ([line.split(",") for line in history.splitlines()]
                                                   for history in (eager_history, compiled_history))
    for column, eager_values, compiled_values in zip(columns, zip(*eager_rows), zip(*compiled_rows)):
        # the remainder (~1e-4) is a difference of numbers near 1: its rounding is absolute, about 1e-7, a unit
        # or two of float32's spacing at the loss (remainder_ulps counts those units)
        atol = 2 if column == "remainder_ulps" else 1e-6
        assert np.allclose(np.float64(eager_values), np.float64(compiled_values), rtol=1e-5, atol=atol), column
    resolved = [yaml.safe_load((root / "runs/regression/boston-gal-epochs3-s0/config.yaml").read_text())
                ["trainer"]["resolved_compile"] for root in (boston_root, compiled_root)]
    assert resolved == [False, True]


def test_gal_and_baseline_runs_log_their_columns(boston_root):
    regression.run(config(boston_root, experiment="boston_baseline"))
    regression.run(config(boston_root))
    baseline_metrics, baseline_history = record(boston_root, "boston-baseline-epochs3-s0")
    gal_metrics, gal_history = record(boston_root, "boston-gal-epochs3-s0")
    assert set(baseline_metrics) == set(gal_metrics) == {"test_mae", "test_mse", "test_r2"}
    assert set(baseline_history.splitlines()[0].split(",")) == {"epoch", "train_loss", "test_mae", "test_mse",
                                                                  "test_r2", "lr"}
    assert {"remainder", "accepted", "cosine", "adjusted_better", "tie", "remainder_ulps", "adjuster_grad_norm",
            "adjuster_move", "adjuster_move_rel"} <= set(gal_history.splitlines()[0].split(","))
    assert len(gal_history.splitlines()) == 1 + 3


def test_a_variant_gets_its_own_record_and_checkpoint_and_leaves_the_preset_run_alone(boston_root):
    regression.run(config(boston_root))
    preset = boston_root / "runs" / "regression" / "boston-gal-epochs3-s0"
    before = {p.name: p.read_bytes() for p in preset.iterdir()}
    regression.run(config(boston_root, "method.ratio=0.001"))
    variant = boston_root / "runs" / "regression" / "boston-gal-eps0.001-epochs3-s0"
    assert {p.name: p.read_bytes() for p in preset.iterdir()} == before
    assert json.loads((variant / "run.json").read_text())["variant"] == "eps0.001-epochs3"
    assert (variant / "metrics.json").read_text() != before["metrics.json"].decode()
    checkpoints = sorted(p.name for p in (boston_root / "checkpoints" / "regression").iterdir())
    assert checkpoints == ["boston-gal-epochs3-s0", "boston-gal-eps0.001-epochs3-s0"]


def test_split_depends_on_the_seed_alone():
    train, test = regression.split(100, 0.2, seed=4)
    assert len(test) == 20 and not set(train) & set(test) and len(train) + len(test) == 100
    assert all(np.array_equal(a, b) for a, b in zip(regression.split(100, 0.2, seed=4), (train, test)))
    assert not np.array_equal(regression.split(100, 0.2, seed=5)[1], test)


@pytest.mark.slow
def test_killed_and_rerun_ends_as_one_finished_mlflow_run_with_uninterrupted_metrics(tmp_path):
    env = train_env(tmp_path)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    for root in (straight, killed):
        write_boston(root, rows=3000)  # long enough epochs to kill one mid-run
    epochs = "task.epochs=6"
    done = train(straight, EXPERIMENT, epochs, env=env)
    assert done.returncode == 0, done.stderr
    name = "boston-gal-epochs6-s0"
    kill_at_first_checkpoint(killed, EXPERIMENT, epochs, env=env,
                             checkpoint=checkpoint_path(killed, "regression", name))
    resumed = train(killed, EXPERIMENT, epochs, env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {name} after epoch" in resumed.stdout
    assert record(killed, name) == record(straight, name)
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("regression").experiment_id])
    assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED"]  # one per root: no orphan


# ------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("overrides, message", [
    (("task.epochs=0",), "task.epochs=0: use an integer of at least 1"),
    (("seed=-1",), "seed=-1: use an integer of at least 0"),
    (("seed=1.5",), "seed=1.5: use an integer of at least 0"),
    (("data.train.batch_size=0",), "data.train.batch_size=0: use an integer of at least 1"),
    (("task.test_fraction=1.5",), "task.test_fraction=1.5: use a fraction between 0 and 1"),
    (("task.test_fraction=half",), "task.test_fraction=half: use a fraction between 0 and 1"),
    (("task.epochs=many",), "task.epochs='many': use an integer of at least 1"),
    (("method.arch=[0]",), "method: dim and hidden widths must be positive"),
    (("optim.lr=-1",), "optim=adam: Invalid learning rate"),
    (("trainer.device=tpu",), "trainer.device='tpu': use auto, cuda or cpu"),
    (("method.ratio=-1",), "method: ratio must be >= 0"),
    (("method.policy=sometimes",), "method: policy must be one of"),
    (("method.kind=rnn",), "method: unknown adjuster kind 'rnn'"),
    (("method.source=uniform",), "method.source=uniform draws noise, so method.arch, method.kind, method.bias"),
    (("method.adjuster_lr=-0.1",), "method.adjuster_lr=-0.1: use a positive number"),
    (("+method.momentum=0.9",), "method.momentum is not a GAL setting"),
    (("+optim.momentum=0.9",), "optim=adam: .*momentum"),
    (("trainer.gpus=2", "trainer.device=auto"), "trainer.gpus=2 but torch sees no CUDA device; set trainer.device=cpu"),
    (("trainer.gpus=2", "trainer.device=cpu"), "task=regression runs on one process"),
    (("trainer.precision=bf16",), "task=regression trains in fp32"),
    # degenerate values: each ran (or failed in epoch 1) before
    (("data.model.hidden=[0,50]",), r"data.model.hidden=\[0, 50\]: use a list of positive integers"),
    (("data.model.hidden=[100,-5]",), r"data.model.hidden=\[100, -5\]: use a list of positive integers"),
    (("data.model.hidden=8",), r"data.model.hidden=8: use a list of positive integers"),
    (("method.arch=[-4]",), "method: dim and hidden widths must be positive integers"),
    (("method.arch=[2.5]",), "method: dim and hidden widths must be positive integers"),
    (("method.ratio=inf",), "method.ratio=inf: use a finite number"),
    (("method.ratio=nan",), "method.ratio=nan: use a finite number"),
    (("method.scale=inf",), "method.scale=inf: use a finite number"),
    (("method.scale=0",), "method: ratio must be >= 0 and scale > 0"),
    (("method.adjuster_lr=inf",), "method.adjuster_lr=inf: use a finite number"),
    (("optim.lr=inf",), "optim.lr=inf: use a finite number"),
    (("optim.weight_decay=nan",), "optim.weight_decay=nan: use a finite number"),
    (("+optim.betas=[0.9,inf]",), r"optim.betas.1=inf: use a finite number"),
    (("+optim.eps=-inf",), "optim.eps=-inf: use a finite number"),
    (("task.test_fraction=0.99",), r"task.test_fraction=0.99 leaves 1 training and 79 test rows of the 80 in .*"
                                   r"boston.npz: training needs at least 14 \(features \+ 1\), testing 2"),
    (("task.test_fraction=0.85",), "task.test_fraction=0.85 leaves 12 training and 68 test rows"),
    (("task.test_fraction=0.001",), "task.test_fraction=0.001 leaves 79 training and 1 test rows"),
    (("seed=4294967296",), "seed=4294967296: use an integer from 0 to 4294967295"),
    (("seed=18446744073709551616",), "seed=18446744073709551616: use an integer from 0 to 4294967295"),
])
def test_bad_settings_are_refused_before_any_compute(boston_root, overrides, message):
    with pytest.raises(ConfigError, match=message):
        regression.run(config(boston_root, *overrides))
    assert not (boston_root / "runs").exists() and not (boston_root / "checkpoints").exists()


def test_baseline_refuses_gal_settings(boston_root):
    with pytest.raises(ConfigError, match=r"method.ratio has no effect without GAL"):
        regression.run(config(boston_root, "+method.ratio=0.1", experiment="boston_baseline"))


def test_missing_or_corrupt_data_names_the_stage_to_rerun(tracked_root):
    with pytest.raises(RunError, match=r"boston.npz is missing: run `dvc repro` .*dvc repro prepare@boston"):
        regression.run(config(tracked_root))
    result = train(tracked_root, "experiment=diabetes_gal")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "diabetes.npz is missing" in result.stderr and not (tracked_root / "runs").exists()
    (tracked_root / "data" / "processed").mkdir(parents=True)
    (tracked_root / "data" / "processed" / "boston.npz").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(RunError, match=r"cannot read .*boston.npz .*rerun its prepare stage: dvc repro prepare@boston"):
        regression.run(config(tracked_root))
    assert not (tracked_root / "runs").exists()


@pytest.mark.parametrize("overrides, message", [
    (("task=regression", "data=boston", "method=gal"), "every run starts from a preset"),
    (("experiment=boston_gal", "profile=nosuch"), "Could not find 'profile/nosuch' Available options"),
    (("experiment=nosuch_gal",), "Could not find 'experiment/nosuch_gal'"),
    (("experiment=boston_gal", "nosuchkey=1"), "Could not override 'nosuchkey'"),
    (("experiment=boston_gal", "method.ratio=abc"), "method.ratio='abc': use a number"),
])
def test_bad_command_lines_are_one_line_and_exit_code_2(boston_root, overrides, message):
    result = train(boston_root, *overrides)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert message in result.stderr and not (boston_root / "runs").exists()


def test_every_user_error_is_one_kind():
    assert issubclass(RunError, UserError) and issubclass(ConfigError, UserError)
