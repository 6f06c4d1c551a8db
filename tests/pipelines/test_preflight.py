"""The preflight (pipelines/preflight/): its plan is DVC's, every paper configuration composes and builds, a
sample covering every task, model, optimiser and adjuster kind runs at full size on the CPU and leaves the
workspace and DVC's state as they were, and every failure is a row with its cause."""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipelines import fanout
from pipelines.config import compose
from pipelines.preflight import __main__ as preflight
from pipelines.preflight.measure import Setting, measure
from pipelines.preflight.plan import plan
from pipelines.profile import switched
from pipelines.training import launch, runner
from tests.workspace import ROOT, copy_project

BIN = Path(sys.executable).parent
# every task, model family, optimiser and adjuster kind of the paper profile, one run each. DETR-R101 is R50's
# code with a deeper backbone: test_every_paper_configuration_composes_and_builds builds it; running it here
# cost 20-30 s more for no other path
SAMPLE = ["train_cifar@cifar10-sgd-gal-0",             # tf_efficientnet_b1, SGD, GAL's MLP
          "train_cifar@cifar100-lookahead-baseline-0",  # Lookahead, plain backward
          "train_cifar@cifar10-adabound-gal-0",         # AdaBound
          "ablate_adjuster@h3-0",                       # a CNN adjuster
          "ablate_noise@uniform-0",                     # noise in place of h
          "train_imagenet@resnet50-gal-0",              # ResNet-50, RMSProp-TF, EMA, RandAugment, JPEG folders
          "train_imagenet@efficientnet_b2-baseline-0",  # EfficientNet-B2 at 256 px
          "train_detection@r50-gal-0",                  # DETR-R50, AdamW, GAL on the boxes, COCOeval
          "train_regression@boston-gal-0",              # the regression MLP, Adam
          "train_regression@diabetes-baseline-0"]       # read from data prepared for the paper profile


def test_the_plan_is_the_commands_dvc_runs_one_per_configuration_and_leaves_params_alone(tmp_path):
    before = (ROOT / "params.yaml").read_bytes()
    runs = plan("paper", [], [])
    assert (ROOT / "params.yaml").read_bytes() == before
    project = tmp_path / "project"
    (project / ".dvc").mkdir(parents=True)
    (project / ".dvc" / "config").write_text("[core]\n    no_scm = True\n")
    (project / "dvc.yaml").write_bytes((ROOT / "dvc.yaml").read_bytes())
    (project / "params.yaml").write_text(switched(before.decode(), "paper"))
    _, commands = fanout.plan([], root=str(project))
    assert sorted(s for r in runs for s in r.stages) == sorted(name for name, _ in commands)
    by_name = dict(commands)
    for run in runs:  # one configuration: the same command but for the seed
        argv = {tuple(a for a in shlex.split(by_name[s]) if not a.startswith("seed=")) for s in run.stages}
        assert len(argv) == 1
    assert len({(r.stage, *(o for o in r.overrides if not o.startswith("seed="))) for r in runs}) == len(runs)
    stages = {r.stage for r in runs}
    assert {"train_cifar", "train_imagenet", "train_detection", "train_regression", "ablate_eps"} <= stages
    assert all("profile=paper" in r.overrides for r in runs)
    assert all(r.seeds == 2 for r in runs if r.stage == "train_cifar")  # image_seeds: [0, 1]
    # a params.yaml value for the plan only: the stage commands follow it
    four = plan("paper", ["train_detection"], ["gpus=4"])
    assert all("trainer.gpus=4" in r.overrides for r in four) and len(four) == 4


@pytest.mark.parametrize("args, message", [
    (["--profile", "papr"], "no profile 'papr'"),
    (["no_such_stage"], "no stage or stage group 'no_such_stage'"),
    (["--steps", "0"], "--steps=0: use at least 1"),
    (["--batch-per-device", "0"], "--batch-per-device=0"),
    (["--world", "3"], "--world=3: use 1 or auto"),
    (["--param", "no_such_key=1"], "no top-level key 'no_such_key'"),
    pytest.param(["--device", "cuda"], "--device=cuda but torch sees no CUDA device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
])
def test_bad_input_is_one_line_before_any_work(tmp_path, capsys, args, message):
    out = tmp_path / "preflight"
    assert preflight.main([*args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not list(tmp_path.iterdir())


def test_a_diverging_run_a_bad_config_and_missing_data_are_rows_with_their_cause(tmp_path):
    from pipelines.preflight.data import provide

    provide(compose("train", ["experiment=boston_gal"]).data, "paper", tmp_path / "none", tmp_path, 0, 0)
    setting = lambda *o: Setting(["profile=paper", *o], "cpu", 1, None, None, [], str(tmp_path))  # noqa: E731
    diverged = measure(setting("experiment=boston_baseline", "optim.lr=1e30"), 2, tmp_path)
    assert diverged.error is None and diverged.measured.nonfinite.startswith("train_loss = ")
    bad = measure(setting("experiment=boston_gal", "method.policy=bogus"), 2, tmp_path)
    assert "policy must be one of" in bad.error and bad.measured is None
    missing = measure(setting("experiment=diabetes_baseline"), 2, tmp_path)
    assert "diabetes.npz is missing" in missing.error
    ok = measure(setting("experiment=boston_gal"), 2, tmp_path)
    assert ok.error is None and len(ok.measured.unit_s) == 2 and ok.measured.checkpoint_bytes > 0


def test_each_configuration_is_also_estimated_at_the_seeds_its_claims_need(tmp_path):
    """Seeds needed: the runs per arm the paper's claims a configuration serves need (paper.yaml's std of the
    table row it makes), and device-h (seeds needed) = that x device-h/run; blank where it serves no such claim."""
    import math

    from pipelines.preflight.plan import PlannedRun
    from pipelines.report import power
    from pipelines.report.paper import lookup
    from pipelines.training.rehearsal import Measured

    args = preflight.parse(["--device", "cpu"])
    measured = Measured("model", "step", [2.0, 0.5, 0.5], [0.0, 0.0, 0.0], 32, 0.2, 32, None, None, 2 ** 30,
                        10 ** 6, 0.1)
    rows = {}
    for stage, preset in (("train_cifar", "cifar10_sgd_gal"), ("train_regression", "boston_baseline"),
                          ("train_detection", "coco_detr_r50_gal")):
        run = PlannedRun(stage, [f"experiment={preset}", "profile=paper", "seed=0"], [f"{stage}@{preset}-0"] * 2)
        rows[preset] = preflight.setting_for(run, args, tmp_path)
        rows[preset].outcome = preflight.Outcome(measured=measured)
    # Table I, SGD: the paper's 1.92 ± 0.12 vs 1.84 ± 0.06, pooled
    sgd = lambda method: lookup(f"Table I/SGD/{method}/error")  # noqa: E731
    std = math.sqrt((sgd("Reproduced")["std"] ** 2 + sgd("GAL")["std"] ** 2) / 2)
    assert rows["cifar10_sgd_gal"].needed == power.runs_needed(sgd("GAL")["mean"] - sgd("Reproduced")["mean"], std)
    assert rows["boston_baseline"].needed == 3   # the most over Table V's Boston claims (MAE, MSE, R2)
    assert rows["coco_detr_r50_gal"].needed is None  # Table IV: the paper gives no std
    for preset, row in rows.items():
        cells = preflight.columns(row)
        keys = list(cells)
        assert keys[keys.index("device-h (all seeds)") + 1:keys.index("status")] == ["seeds needed",
                                                                                     "device-h (seeds needed)"]
        if row.needed is None:
            assert cells["seeds needed"] == cells["device-h (seeds needed)"] == ""
        else:
            assert cells["seeds needed"] == str(row.needed)
            assert cells["device-h (seeds needed)"] == preflight.hours_text(row.hours() * row.needed)
    lines = preflight.totals(list(rows.values()))
    cifar = rows["cifar10_sgd_gal"]
    assert f"| train_cifar | cpu | 2 | {preflight.hours_text(cifar.hours() * 2)} | {cifar.needed}, " \
           f"{preflight.hours_text(cifar.hours() * cifar.needed)} |" in lines
    detr = rows["coco_detr_r50_gal"]  # no claim to size it by: at its planned seeds
    assert f"| train_detection | cpu | 2 | {preflight.hours_text(detr.hours() * 2)} | 2, " in "\n".join(lines)


@pytest.mark.slow  # builds every paper configuration's full-size task: about a minute
def test_every_paper_configuration_composes_and_builds(tmp_path):
    args = preflight.parse(["--device", "cpu", "--batch-per-device", "1", "--random-init", "--steps", "1"])
    rows = [preflight.setting_for(run, args, tmp_path) for run in plan("paper", [], [])]
    assert all(row.setting is not None for row in rows), [row.outcome.error for row in rows if row.setting is None]
    preflight.provide_data(rows, args, tmp_path)
    procs = launch.Processes(0, 0, 1, torch.device("cpu"))
    built = set()
    for row in rows:
        cfg = compose("train", row.setting.all_overrides())
        task_cls = runner.task_class(cfg.task.name)
        runner.check(cfg, task_cls)
        key = (cfg.task.name, cfg.get("experiment"), cfg.method.get("kind"), cfg.method.get("source"))
        if key not in built:  # one build per model, optimiser and adjuster kind; the rest are checked
            assert task_cls(cfg, procs).describe()
            built.add(key)
    assert len(rows) > 100 and len(built) > 20


@pytest.mark.slow  # the CPU preflight of the sample at full size: about three minutes on 2 cores
def test_the_sample_runs_at_full_size_and_leaves_the_workspace_and_dvc_as_they_were(tmp_path):
    repo = copy_project(tmp_path / "repo")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch), "PYTHONWARNINGS": "ignore::UserWarning",
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "torch-cache")}  # torch's own cache, kept across runs
    run = lambda *cmd, **kw: subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, **kw)  # noqa: E731
    prepared = run(BIN / "python", "-m", "pipelines.prepare.regression", "data=diabetes", "profile=paper")
    assert prepared.returncode == 0, prepared.stderr
    status_before = run(BIN / "dvc", "status", "--json").stdout
    params = (repo / "params.yaml").read_bytes()

    done = run(BIN / "python", "-m", "pipelines.preflight", "--device", "cpu", "--steps", "2",
               "--batch-per-device", "1", "--random-init", *SAMPLE, timeout=1200)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-3000:]
    table = (repo / "reports" / "preflight.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and " ok" in line]
    assert len(rows) == len(SAMPLE), table
    for line in rows:
        cells = [c.strip() for c in line.split("|")[1:-1]]
        assert "GiB RSS" in cells[9] and float(cells[11].replace(",", "")) > 0, line  # peak memory, device-hours per run
    assert "diabetes prepared" in table and "imagenet made on the fly" in table and "coco made on the fly" in table
    assert (repo / "reports" / "preflight.csv").read_text().count("\n") == len(SAMPLE) + 1

    # nothing recorded, nothing left behind, DVC's view unchanged
    assert run(BIN / "dvc", "status", "--json").stdout == status_before
    assert (repo / "params.yaml").read_bytes() == params
    assert not (repo / "runs").exists() and not (repo / "checkpoints").exists() and not (repo / "mlflow.db").exists()
    assert run("git", "status", "--porcelain").stdout == ""
    assert not list(scratch.iterdir())

    # at its real world size under torchrun (gloo on the CPU), as WORLD=auto on a multi-GPU node
    done = run(BIN / "python", "-m", "pipelines.preflight", "--device", "cpu", "--steps", "2", "--batch-per-device",
               "1", "--random-init", "--world", "auto", "--param", "gpus=2", "ablate_policy@always-0", timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-3000:]
    line = next(x for x in (repo / "reports" / "preflight.md").read_text().splitlines() if "policy-always" in x)
    assert "| 2 | 1 (of 160) |" in line and " ok" in line


def test_the_profile_switch_selects_each_profiles_grids_and_make_profile_writes_it(tmp_path):
    import yaml

    text = (ROOT / "params.yaml").read_text()
    for profile, ablations, protocols, seeds in (("paper", "paper", "regression", "table5"),
                                                 ("regression", "smoke", "regression", "table5"),
                                                 ("smoke", "smoke", "smoke", "smoke")):
        params = yaml.safe_load(switched(text, profile))
        assert params["profile"] == profile
        assert params["ablations"] == params["ablation_grids"][ablations]
        assert params["protocols"] == params["protocol_grids"][protocols]
        assert params["seeds"] == params["seed_grids"][seeds]
    (tmp_path / "params.yaml").write_text(text)
    done = subprocess.run([BIN / "python", "-m", "pipelines.profile", "paper"], cwd=tmp_path, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0 and (tmp_path / "params.yaml").read_text() == switched(text, "paper")
    done = subprocess.run([BIN / "python", "-m", "pipelines.profile", "papr"], cwd=tmp_path, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 2 and done.stderr.strip() == ("profile: bad config: no profile 'papr'; choose one of: "
                                                            "paper regression smoke")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_out_of_memory_on_cuda_is_a_row_with_the_largest_per_device_batch_that_fits(tmp_path):
    from pipelines.preflight.data import provide

    provide(compose("train", ["experiment=cifar100_sgd_gal"]).data, "paper", tmp_path / "none", tmp_path, 320, 100)
    setting = Setting(["experiment=cifar100_sgd_gal", "profile=paper"], "cuda", 1, 320, None,
                      ["model.pretrained=false"], str(tmp_path))
    torch.cuda.set_per_process_memory_fraction(0.02)  # about 1.6 GB of an 80 GB card: batch 320 cannot fit
    try:
        outcome = measure(setting, 2, tmp_path)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert outcome.oom and "out of memory at per-device batch 320; the largest per-device batch that fits: " in outcome.error
    fits = int(outcome.error.rsplit(" ", 1)[1])
    assert 1 <= fits < 320 and outcome.measured.per_unit == fits
