"""End to end: `dvc repro` of the smoke profile in a temporary copy of the repo, tracked by a real MLflow
server on 127.0.0.1; then the no-op rerun, a selective rerun, the report files and the audit trail."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from tests.network import free_port

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DATASETS, METHODS, SEEDS = ("boston", "diabetes", "california"), ("baseline", "gal"), range(5)
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
    return [f"cifar100_{optim}-gal-{variant}-s{s}" for optim, variant in variants for s in IMAGE_SEEDS]


ABLATION_RUNS = ablation_runs()
REPORT_FILES = ["index.md", "provenance.json", "tables/claims.md", "tables/claims.csv", "tables/claims.tex",
                *(f"tables/table{n}.{ext}" for n in (1, 2, 3, 4, 5, 6, 7, 8) for ext in ("md", "csv", "tex")),
                *(f"figures/{name}.{ext}" for name in ("fig4_toy3d", "fig5_val_loss", "fig6_remainder_cosine",
                                                       "fig7_sensitivity", "fig8a_update_policies",
                                                       "fig8b_adjusted_better") for ext in ("png", "pdf"))]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    store = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    server = subprocess.Popen(
        [BIN / "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}", "--default-artifact-root", str(store / "art")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})  # no job workers: faster start
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2):
                break
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                pytest.fail("mlflow server did not come up on 127.0.0.1")
            time.sleep(0.5)
    yield uri
    server.terminate()
    server.wait(timeout=30)


@pytest.fixture(scope="module")
def project(tmp_path_factory, mlflow_server):
    """A fresh git copy of the committed-or-working tree (no outputs), with the smoke pipeline run once."""
    repo = tmp_path_factory.mktemp("repo")
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if (ROOT / name).is_file() and name != "dvc.lock":  # this checkout's lock describes its own outputs
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, repo / name)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "MLFLOW_TRACKING_URI": mlflow_server}
    env.pop("GAL_DATA_MIRROR", None)
    git = lambda *args: subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)  # noqa: E731
    git("init", "-q")
    git("add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy")
    first = dvc(repo, env, "repro")
    return repo, env, first


def dvc(repo: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([BIN / "dvc", *args], cwd=repo, env=env, capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def stages_run(result: subprocess.CompletedProcess) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", result.stdout))


def test_first_repro_runs_every_stage_and_writes_every_report_file(project):
    repo, _, first = project
    ran = stages_run(first)
    assert {f"prepare@{d}" for d in DATASETS} <= ran and {"toy3d", "report"} <= ran
    assert sum(stage.startswith("train_regression@") for stage in ran) == 30
    assert {"prepare_cifar@cifar10", "prepare_cifar@cifar100", "prepare_imagenet", "prepare_coco"} <= ran
    assert sum(stage.startswith("train_detection@") for stage in ran) == len(DETECTION_RUNS)
    assert sum(stage.startswith("train_cifar@") for stage in ran) == len(CIFAR_RUNS)
    assert sum(stage.startswith("train_imagenet@") for stage in ran) == len(IMAGENET_RUNS)
    assert sum(stage.startswith("ablate_") for stage in ran) == len(ABLATION_RUNS)
    for name in ABLATION_RUNS:  # every variant has its own record, named by what differs from its preset
        meta = json.loads((repo / "runs/classification" / name / "run.json").read_text())
        assert meta["variant"] and f"-gal-{meta['variant']}-s" in name
    for name in REPORT_FILES:
        assert (repo / "reports" / name).stat().st_size > 0, name
    index = (repo / "reports" / "index.md").read_text()
    assert "smoke" in index and all(f"## {name}" in index for name in (
        "Table I", "Table II", "Table III", "Table IV", "Table V", "Table VI", "Table VII", "Table VIII", "Fig. 4",
        "Fig. 5", "Fig. 6", "Fig. 7", "Fig. 8a", "Fig. 8b"))
    assert "Not rendered" not in index  # every spec found its runs


def test_mlflow_server_lists_every_run_with_params_metrics_and_tags(project, mlflow_server):
    repo, _, _ = project
    client = MlflowClient(mlflow_server)
    regression = client.search_runs([client.get_experiment_by_name("regression").experiment_id], max_results=100)
    assert len(regression) == 30
    record = json.loads((repo / "runs/regression/boston-gal-s3/run.json").read_text())
    run = client.get_run(record["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "boston-gal-s3"
    assert run.data.params["method.name"] == "gal" and run.data.params["seed"] == "3"
    assert run.data.params["method.arch"] in ("[16, 4]", "[16,4]") and run.data.tags["variant"] == ""
    assert {"test_mae", "test_mse", "test_r2", "train_loss", "remainder"} <= set(run.data.metrics)
    assert len(client.get_metric_history(run.info.run_id, "test_mae")) > 1  # per-epoch history
    tags = run.data.tags
    assert re.fullmatch(r"[0-9a-f]{40}", tags["git_commit"]) and tags["profile"] == "smoke"
    assert tags["dvc_stage"] == "train_regression@boston-gal-3"
    assert any(key.startswith("data.") and value.startswith("md5:") for key, value in tags.items())
    assert re.fullmatch(r"[0-9a-f]{64}", tags["env_lock_sha256"])
    detection = client.search_runs([client.get_experiment_by_name("detection").experiment_id], max_results=100)
    assert sorted(r.info.run_name for r in detection) == sorted(DETECTION_RUNS)
    assert all(r.info.status == "FINISHED" and "val_AP" in r.data.metrics for r in detection)
    toy = client.search_runs([client.get_experiment_by_name("toy3d").experiment_id], max_results=100)
    assert sorted(r.info.run_name for r in toy) == sorted(TOY_RUNS)


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
    assert "MLflow cross-check: OK" in table8.stdout and "cifar100_sgd-gal-mlp-256-s1" in table8.stdout


def test_changing_one_parameter_reruns_only_what_depends_on_it(project):
    repo, env, _ = project
    config = repo / "pipelines/conf/experiment/boston_gal.yaml"
    config.write_text(config.read_text().replace("arch: [16, 4]", "arch: [16, 8]"))
    preset = repo / "pipelines/conf/experiment/cifar10_adabound_gal.yaml"
    preset.write_text(preset.read_text().replace("ratio: 0.01", "ratio: 0.02"))
    result = dvc(repo, env, "repro")
    assert stages_run(result) == ({"report"} | {f"train_regression@boston-gal-{s}" for s in SEEDS}
                                  | {f"train_cifar@cifar10-adabound-gal-{s}" for s in IMAGE_SEEDS})
    # the persisted checkpoint of the old config is not resumed: the run starts over
    assert "starting cifar10_adabound-gal-s0 over" in result.stdout
    config = yaml.safe_load((repo / "runs/classification/cifar10_adabound-gal-s0/config.yaml").read_text())
    assert config["method"]["ratio"] == 0.02
