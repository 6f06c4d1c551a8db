"""End to end: the smoke profile in a temporary copy of the repo, reproduced by `make repro`'s command (real
DVC, the runs started warm) and tracked by a real MLflow server on 127.0.0.1; then the no-op `dvc repro`, a
selective rerun, the report files, MLflow's own views of the runs and the audit trail. (`make fanout`:
tests/pipelines/test_fanout.py; on 2 cores it is the slower way to run the smoke profile, BENCHMARKS.md.)"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from tests import network
from tests.workspace import copy_project

pytestmark = pytest.mark.slow  # the whole smoke pipeline: many minutes

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DATASETS, METHODS = ("boston", "diabetes", "california"), ("baseline", "gal")
SEEDS = yaml.safe_load((ROOT / "params.yaml").read_text())["seed_grids"]["smoke"]  # Table V's smoke seeds
TOY_RUNS = [f"{o}-{m}" for o in ("gd", "lookahead", "rmsprop", "adam", "adabound") for m in METHODS]
IMAGE_SEEDS = range(2)
CIFAR_RUNS = [f"{d}_{o}-{m}-s{s}" for d in ("cifar10", "cifar100") for o in ("sgd", "lookahead", "adabound")
              for m in METHODS for s in IMAGE_SEEDS]
IMAGENET_RUNS = [f"imagenet_{n}-{m}-s{s}" for n in ("resnet50", "efficientnet_b2") for m in METHODS
                 for s in IMAGE_SEEDS]
DETECTION_RUNS = [f"coco_detr_{b}-{m}-s{s}" for b in ("r50", "r101") for m in METHODS for s in IMAGE_SEEDS]


def ablation_runs() -> list[str]:
    """The run names params.yaml's smoke ablation grid gives (the ablate_* stages of dvc.yaml)."""
    grid = yaml.safe_load((ROOT / "params.yaml").read_text())["ablation_grids"]["smoke"]
    variants = [("sgd", f"{prefix}src-{source}") for source in grid["noise_sources"] for prefix in ("", "norm-false-")]
    variants += [("sgd", f"{h['kind']}-{h['widths']}") for h in grid["adjusters"]]
    variants += [("sgd", f"policy-{policy}") for policy in grid["policies"]]
    variants += [(p["optim"], f"{token}{p['value']}") for token, key in (("eps", "eps"), ("scale", "scale"))
                 for p in grid[key]]
    variants += [("lookahead", f"mlp-{widths}") for widths in grid["lookahead_widths"]]
    return [f"cifar100_{optim}-gal-{variant}-s{s}" for optim, variant in variants for s in grid["seeds"]]


ABLATION_RUNS = ablation_runs()


def protocol_runs() -> list[str]:
    """The run names params.yaml's smoke protocol grid gives (the protocol and protocol_eps stages)."""
    grid = yaml.safe_load((ROOT / "params.yaml").read_text())["protocol_grids"]["smoke"]
    names = [f"{d}-{m}-{p['variant']}" for d in grid["datasets"] for m in METHODS for p in grid["points"]]
    names += [f"{d}-gal-eps{e}" for d in grid["datasets"] for e in grid["eps"]]
    return [f"{name}-s{s}" for name in names for s in grid["seeds"]]


PROTOCOL_RUNS = protocol_runs()


def beyond_runs() -> dict[str, list[str]]:
    """Task -> the run names params.yaml's smoke "Beyond the paper" grid gives (the beyond_* stages)."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    grid, arms = params["beyond_grids"]["smoke"], params["beyond_arms"]
    names = {"regression": [f"{d}-{a['method']}-{a['token']}" for d in grid["datasets"] for a in arms],
             "digits": [f"digits_{m}-{a['method']}-{a['token']}" for m in grid["digits"] for a in arms]}
    names["regression"] += [f"{b['dataset']}-{a['method']}-{a['token']}-{b['suffix']}" for b in grid["closest"]
                            for a in arms]
    return {task: [f"{name}-s{s}" for name in runs for s in grid["seeds"]] for task, runs in names.items()}


BEYOND_RUNS = beyond_runs()
REPORT_FILES = ["index.md", "provenance.json", "tables/claims.md", "tables/claims.csv", "tables/claims.tex",
                *(f"tables/table{n}.{ext}" for n in (1, 2, 3, 4, 5, 6, 7, 8) for ext in ("md", "csv", "tex")),
                *(f"tables/protocol_study.{ext}" for ext in ("md", "csv", "tex")),
                *(f"figures/protocol_curves.{ext}" for ext in ("png", "pdf")),
                *(f"tables/{name}.{ext}" for name in ("table5_width_one", "precision", "beyond_the_paper")
                  for ext in ("md", "csv", "tex")),
                *(f"figures/{name}.{ext}" for name in ("fig4_toy3d", "fig5_val_loss", "fig6_remainder_cosine",
                                                       "fig7_sensitivity", "fig8a_update_policies",
                                                       "fig8b_adjusted_better", "beyond_the_paper")
                  for ext in ("png", "pdf"))]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    with network.mlflow_server(tmp_path_factory.mktemp("mlflow")) as uri:
        yield uri


@pytest.fixture(scope="module")
def project(tmp_path_factory, mlflow_server):
    """A fresh git copy of the committed-or-working tree (no outputs), with the smoke pipeline run once
    through `make repro`'s command."""
    repo = copy_project(tmp_path_factory.mktemp("repo"))
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "MLFLOW_TRACKING_URI": mlflow_server}
    for name in ("GAL_DATA_MIRROR", "GAL_LAUNCHER", "CUDA_VISIBLE_DEVICES"):
        env.pop(name, None)
    return repo, env, make_repro(repo, env)


def make_repro(repo: Path, env: dict) -> subprocess.CompletedProcess:
    """`make repro`'s command: `dvc repro` with its train commands started warm, every one of them served."""
    done = subprocess.run([BIN / "python", "-m", "pipelines.warm", BIN / "python", "-m", "pipelines.dvc_cli", "repro"], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=2400)
    assert done.returncode == 0 and "starts cold" not in done.stderr, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def dvc(repo: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([BIN / "dvc", *args], cwd=repo, env=env, capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def stages_run(result: subprocess.CompletedProcess) -> set[str]:
    """The stages DVC ran."""
    return set(re.findall(r"Running stage '([^']+)'", result.stdout))


def test_first_repro_runs_every_stage_and_writes_every_report_file(project):
    repo, _, first = project
    ran = stages_run(first)
    assert {f"prepare@{d}" for d in DATASETS} <= ran and {"toy3d", "precision", "report"} <= ran
    assert sum(stage.startswith("train_regression@") for stage in ran) == len(DATASETS) * len(METHODS) * len(SEEDS)
    assert {"prepare_cifar@cifar10", "prepare_cifar@cifar100", "prepare_imagenet", "prepare_coco"} <= ran
    assert sum(stage.startswith("train_detection@") for stage in ran) == len(DETECTION_RUNS)
    assert sum(stage.startswith("train_cifar@") for stage in ran) == len(CIFAR_RUNS)
    assert sum(stage.startswith("train_imagenet@") for stage in ran) == len(IMAGENET_RUNS)
    assert sum(stage.startswith("ablate_") for stage in ran) == len(ABLATION_RUNS)
    assert sum(stage.startswith(("protocol@", "protocol_eps@")) for stage in ran) == len(PROTOCOL_RUNS)
    assert {"prepare_digits", "beyond_toy3d"} <= ran
    assert sum(stage.startswith(("beyond_regression@", "beyond_closest@", "beyond_digits@")) for stage in ran) == \
        sum(map(len, BEYOND_RUNS.values()))
    for name in ABLATION_RUNS:  # every variant has its own record, named by what differs from its preset
        meta = json.loads((repo / "runs/classification" / name / "run.json").read_text())
        assert meta["variant"] and f"-gal-{meta['variant']}-s" in name
    for name in REPORT_FILES:
        assert (repo / "reports" / name).stat().st_size > 0, name
    index = (repo / "reports" / "index.md").read_text()
    assert "smoke" in index and all(f"## {name}" in index for name in (
        "Table I", "Table II", "Table III", "Table IV", "Table V", "Table VI", "Table VII", "Table VIII", "Fig. 4",
        "Fig. 5", "Fig. 6", "Fig. 7", "Fig. 8a", "Fig. 8b", "Protocol study", "Protocol curves", "Table V at d = 1",
        "Precision study", "Beyond the paper", "Beyond the paper (figure)"))
    assert "Not rendered" not in index  # every spec found its runs


def test_mlflow_server_lists_every_run_with_params_metrics_and_tags(project, mlflow_server):
    repo, _, _ = project
    client = MlflowClient(mlflow_server)
    regression = client.search_runs([client.get_experiment_by_name("regression").experiment_id], max_results=100)
    assert sorted(r.info.run_name for r in regression) == sorted(
        [f"{d}-{m}-s{s}" for d in DATASETS for m in METHODS for s in SEEDS] + PROTOCOL_RUNS + BEYOND_RUNS["regression"])
    digits = client.search_runs([client.get_experiment_by_name("digits").experiment_id], max_results=100)
    assert sorted(r.info.run_name for r in digits) == sorted(BEYOND_RUNS["digits"])
    toy = client.search_runs([client.get_experiment_by_name("toy3d_beyond").experiment_id], max_results=100)
    assert len(toy) == 4 * len(SEEDS) and all(r.info.status == "FINISHED" for r in toy)  # gd: 4 arms x seeds
    record = json.loads((repo / "runs/regression/boston-gal-s1/run.json").read_text())
    run = client.get_run(record["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "boston-gal-s1"
    assert run.data.params["method.name"] == "gal" and run.data.params["seed"] == "1"
    assert run.data.params["method.arch"] in ("[16, 4]", "[16,4]") and run.data.tags["variant"] == ""
    assert {"test_mae", "test_mse", "test_r2", "train_loss", "remainder"} <= set(run.data.metrics)
    assert len(client.get_metric_history(run.info.run_id, "test_mae")) > 1  # per-epoch history
    tags = run.data.tags
    assert re.fullmatch(r"[0-9a-f]{40}", tags["git_commit"]) and tags["profile"] == "smoke"
    assert tags["dvc_stage"] == "train_regression@boston-gal-1"
    assert any(key.startswith("data.") and value.startswith("md5:") for key, value in tags.items())
    assert re.fullmatch(r"[0-9a-f]{64}", tags["env_lock_sha256"])
    detection = client.search_runs([client.get_experiment_by_name("detection").experiment_id], max_results=100)
    assert sorted(r.info.run_name for r in detection) == sorted(DETECTION_RUNS)
    assert all(r.info.status == "FINISHED" and "val_AP" in r.data.metrics for r in detection)
    toy = client.search_runs([client.get_experiment_by_name("toy3d").experiment_id], max_results=100)
    assert sorted(r.info.run_name for r in toy) == sorted(TOY_RUNS)


def test_every_training_run_shows_in_mlflows_own_views(project, mlflow_server):
    """Source tags, datasets as inputs and the record and loss curve as artifacts, read through MLflow's
    client (served by the server's artifact proxy), for every run the training stages made."""
    repo, _, _ = project
    client = MlflowClient(mlflow_server)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    for task in ("regression", "digits", "classification", "detection"):
        experiment = client.get_experiment_by_name(task)
        assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
        for run in client.search_runs([experiment.experiment_id], max_results=500):
            tags, name = run.data.tags, run.info.run_name
            assert tags["mlflow.source.name"] == "pipelines/train.py" and tags["mlflow.source.git.commit"] == head
            record = json.loads((repo / "runs" / task / name / "run.json").read_text())
            inputs = {i.dataset.name: "md5:" + i.dataset.digest for i in run.inputs.dataset_inputs}
            assert inputs == record["data_checksums"], name
            artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
            assert "record" in artifacts, name
    run = client.get_run(json.loads((repo / "runs/regression/boston-gal-s0/run.json").read_text())["mlflow_run_id"])
    downloaded = Path(client.download_artifacts(run.info.run_id, "record/metrics.json", str(repo / "downloaded")))
    assert downloaded.read_bytes() == (repo / "runs/regression/boston-gal-s0/metrics.json").read_bytes()


def test_image_runs_are_tracked_with_metrics_and_checkpoints(project, mlflow_server):
    repo, _, _ = project
    client = MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("classification").experiment_id], max_results=100)
    assert sorted(r.info.run_name for r in runs) == sorted(CIFAR_RUNS + IMAGENET_RUNS + ABLATION_RUNS)
    for run in runs:  # only the raw-noise runs may diverge, and then as a recorded result
        meta = json.loads((repo / "runs/classification" / run.info.run_name / "run.json").read_text())
        diverged = meta.get("status") == "diverged"
        assert run.info.status == ("FAILED" if diverged else "FINISHED") and diverged == ("diverged_epoch" in run.data.tags)
        assert not diverged or "-norm-false-" in run.info.run_name
    record = json.loads((repo / "runs/classification/imagenet_resnet50-gal-s1/run.json").read_text())
    run = client.get_run(record["mlflow_run_id"])
    assert run.data.params["experiment"] == "imagenet_resnet50" and run.data.params["task.ema_decay"] == "0.9"
    assert {"val_loss", "val_top1_err", "val_top5_err", "raw_val_top1_err", "remainder", "cosine", "accepted",
            "adjusted_better", "lr", "time_per_image", "params_model", "params_adjuster"} <= set(run.data.metrics)
    history = client.get_metric_history(run.info.run_id, "val_loss")
    assert sorted({m.step for m in history}) == [1, 2, 3]  # per epoch (the final value is logged at step 3 too)
    assert run.data.tags["dvc_stage"] == "train_imagenet@resnet50-gal-1"
    state = torch.load(repo / "checkpoints/classification/imagenet_resnet50-gal-s1/last.pt", weights_only=True)
    assert state["epoch"] == 3 and state["task"]["adjuster"] and state["task"]["ema"]


def test_dvc_metrics_and_plots_see_the_run_records(project):
    repo, env, _ = project
    metrics = dvc(repo, env, "metrics", "show", "--json").stdout
    assert "test_mae" in metrics and "boston-gal-s0" in metrics
    plots = dvc(repo, env, "plots", "show", "--json").stdout
    assert "history.csv" in plots


def test_second_repro_does_nothing(project):
    repo, env, _ = project
    again = dvc(repo, env, "repro")
    assert stages_run(again) == set()


def test_audit_traces_table_cells_to_their_runs(project):
    repo, env, _ = project
    result = subprocess.run([sys.executable, "-m", "pipelines.audit", "Table V", "Boston", "GAL", "MAE"],
                            cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    for seed in SEEDS:
        record = json.loads((repo / f"runs/regression/boston-gal-s{seed}/run.json").read_text())
        assert record["mlflow_run_id"] in result.stdout
    assert "MLflow cross-check: OK" in result.stdout
    assert "train_regression@boston-gal-0" in result.stdout
    table1 = subprocess.run([sys.executable, "-m", "pipelines.audit", "Table I", "SGD", "GAL", "error"],
                            cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert table1.returncode == 0, table1.stderr
    assert "MLflow cross-check: OK" in table1.stdout and "train_cifar@cifar10-sgd-gal-1" in table1.stdout
    table4 = subprocess.run([sys.executable, "-m", "pipelines.audit", "Table IV", "DETR-R50", "GAL", "AP50"],
                            cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert table4.returncode == 0, table4.stderr
    assert "MLflow cross-check: OK" in table4.stdout and "train_detection@r50-gal-0" in table4.stdout
    table8 = subprocess.run([sys.executable, "-m", "pipelines.audit", "Table VIII", "MLP", "256", "error"],
                            cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert table8.returncode == 0, table8.stderr
    assert "MLflow cross-check: OK" in table8.stdout and "cifar100_sgd-gal-mlp-256-s0" in table8.stdout
    study = subprocess.run([sys.executable, "-m", "pipelines.audit", "Protocol study", "Boston", "eps1", "GAL",
                            "accepted"], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert study.returncode == 0, study.stderr  # a per-epoch metric: the last epoch's, in MLflow too
    assert "MLflow cross-check: OK" in study.stdout and "protocol_eps@boston-1-0" in study.stdout


def test_changing_one_parameter_reruns_only_what_depends_on_it(project):
    repo, env, _ = project
    config = repo / "pipelines/conf/experiment/boston_gal.yaml"
    config.write_text(config.read_text().replace("arch: [16, 4]", "arch: [16, 8]"))
    preset = repo / "pipelines/conf/experiment/cifar10_adabound_gal.yaml"
    preset.write_text(preset.read_text().replace("ratio: 0.01", "ratio: 0.02"))
    result = make_repro(repo, env)
    ran = stages_run(result)
    study = {s for s in ran if s.startswith(("protocol@boston-gal-", "protocol_eps@boston-"))}  # Boston's GAL runs
    assert len(study) == sum(name.startswith("boston-gal-") for name in PROTOCOL_RUNS)
    beyond = {s for s in ran if s.startswith("beyond_regression@boston-")}  # Boston's GAL arms of our own study
    assert len(beyond) == sum(name.startswith("boston-gal-") for name in BEYOND_RUNS["regression"])
    # the precision study reads the presets' hyper-parameters: a preset's change reruns it too
    assert ran == ({"report", "precision"} | {f"train_regression@boston-gal-{s}" for s in SEEDS} | study | beyond
                   | {f"train_cifar@cifar10-adabound-gal-{s}" for s in IMAGE_SEEDS})
    # the persisted checkpoint of the old config is not resumed: the run starts over
    assert "starting cifar10_adabound-gal-s0 over" in result.stdout
    config = yaml.safe_load((repo / "runs/classification/cifar10_adabound-gal-s0/config.yaml").read_text())
    assert config["method"]["ratio"] == 0.02
