"""The cluster path (pipelines/training/cluster.py) as far as a machine without Slurm allows: submitit's local
executor runs the same job a Slurm node would (2 gloo tasks equal a 2-process torchrun run), a pre-empted
job requeues itself and resumes into the same MLflow run, a rerun attaches to a live job, an outer
allocation's environment does not leak into the job, and the Slurm batch script of a 2-node, 4-GPU run
(submitted to stand-in sbatch and srun) carries the node, task, GPU, time, signal and requeue settings. Bad
cluster settings, an unusable job folder among them, are one line before anything is submitted."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from pipelines.errors import ConfigError
from pipelines.tasks.regression import task as regression
from pipelines.training import cluster
from tests.network import mlflow_server
from tests.pipelines.test_regression import record
from tests.pipelines.test_tracking import without_root_override
from tests.pipelines.train_helpers import (ROOT, checkpoint_path, name_of, outcome, start, train, train_cmd,
                                           train_config, train_env, wait_for, with_data, write_boston)

FOLDER = Path("logs/submitit")
BOSTON = "experiment=boston_gal"


def job_folder(root: Path, task: str, run: str) -> Path:
    return root / FOLDER / task / run


def runs_of(uri: str, experiment: str) -> list:
    client = MlflowClient(uri)
    return client.search_runs([client.get_experiment_by_name(experiment).experiment_id])


def local_env(root: Path, **extra: str) -> dict:
    return train_env(root, **{"GAL_LAUNCHER": "submitit-local", "GAL_CLUSTER_CONFIG": str(root / "cluster.yaml"),
                              "OMP_NUM_THREADS": "1", **extra})


@pytest.mark.slow
def test_two_submitit_tasks_equal_a_two_process_torchrun_run(tmp_path, prepared_cifar10):
    overrides = ("experiment=cifar10_sgd_gal", "model.name=test_efficientnet_gn", "model.bn_momentum=null",
                 "model.drop_rate=0", "task.epochs=2", "trainer.device=cpu", "method.ratio=0.1", "trainer.gpus=2")
    run = name_of(*overrides)
    results = {}
    for launcher in ("local", "submitit-local"):
        root = with_data(tmp_path / launcher, prepared_cifar10)
        env = local_env(root, GAL_LAUNCHER=launcher)
        done = train(root, *overrides, env=env)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert ("launching 2 processes" in done.stdout) == (launcher == "local")  # the job needs no torchrun
        results[launcher] = outcome(root, "classification", run)
        (mlflow_run,) = runs_of(env["MLFLOW_TRACKING_URI"], "classification")
        if launcher == "submitit-local":
            job = json.loads((job_folder(root, "classification", run) / "job.json").read_text())
            assert mlflow_run.data.tags["job_id"] == job["job_id"] and mlflow_run.data.tags["job_nodes"]
            assert sorted(job_folder(root, "classification", run).glob("*_log.out"))[-1].name.endswith("_1_log.out")
    (h1, m1, w1), (h2, m2, w2) = results.values()
    assert h1 == h2 and m1 == m2 and all(torch.equal(w1[k], w2[k]) for k in w1)


@pytest.mark.slow
def test_a_preempted_job_requeues_and_resumes_into_the_same_mlflow_run(tmp_path):
    epochs, name = "task.epochs=8", "boston-gal-epochs8-s0"
    straight, preempted = tmp_path / "straight", tmp_path / "preempted"
    for root in (straight, preempted):
        write_boston(root, rows=3000)  # epochs long enough to signal the job mid-run
    done = train(straight, BOSTON, epochs, env=local_env(straight, GAL_LAUNCHER="local"))
    assert done.returncode == 0, done.stderr
    env = local_env(preempted)
    stage = start(preempted, BOSTON, epochs, env=env)
    folder = job_folder(preempted, "regression", name)
    wait_for(checkpoint_path(preempted, "regression", name), [stage])
    controller = json.loads((folder / "job.json").read_text())["job_id"]
    (task,) = subprocess.run(["pgrep", "-P", controller], capture_output=True, text=True).stdout.split()
    os.kill(int(task), signal.SIGUSR2)  # what Slurm sends signal_delay_s before the end
    out = stage.communicate(timeout=300)[0]
    assert stage.returncode == 0, out
    log = "".join(p.read_text() for p in sorted(folder.glob("*_0_log.*")))
    assert "this job is preempted" in log and "Requeued job" in log and f"resuming {name} after epoch" in log
    assert record(preempted, name) == record(straight, name)
    (run,) = runs_of(env["MLFLOW_TRACKING_URI"], "regression")
    assert run.info.status == "FINISHED" and run.data.tags["job_id"] == controller


@pytest.mark.slow
def test_a_rerun_attaches_to_its_live_job_instead_of_submitting_another(tmp_path):
    root = tmp_path
    write_boston(root, rows=3000)
    epochs, name = "task.epochs=30", "boston-gal-epochs30-s0"  # about 20 s: still running at the rerun
    env = local_env(root)
    first = subprocess.Popen(train_cmd(root, BOSTON, epochs), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)  # its job lives on
    folder = job_folder(root, "regression", name)
    wait_for(folder / "job.json", [first], limit=120)
    first.kill()  # the stage process only (dvc killed, a login session closed)
    first.wait()
    job = json.loads((folder / "job.json").read_text())["job_id"]
    again = train(root, BOSTON, epochs, env=env)
    assert again.returncode == 0, again.stderr
    assert f"attached to its submitit-local job {job}" in again.stdout and "submitted" not in again.stdout
    assert [p.name for p in folder.glob("*_submitted.pkl")] == [f"{job}_submitted.pkl"]
    assert [r.info.status for r in runs_of(env["MLFLOW_TRACKING_URI"], "regression")] == ["FINISHED"]


def test_a_live_job_with_other_overrides_is_refused_in_one_line(tmp_path):
    folder = job_folder(tmp_path, "regression", "boston-gal-s0")
    folder.mkdir(parents=True)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "submitit"])
    try:
        (folder / "job.json").write_text(json.dumps({"launcher": "submitit-local", "job_id": str(sleeper.pid),
                                                     "argv": ["experiment=boston_gal", "optim.lr=0.5"]}))
        write_boston(tmp_path)
        done = train(tmp_path, BOSTON, env=local_env(tmp_path))
    finally:
        sleeper.kill()
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert f"job {sleeper.pid} of run boston-gal-s0 is still running with other overrides" in done.stderr


def test_an_outer_allocation_does_not_leak_into_the_job(tmp_path):
    write_boston(tmp_path)
    outer = {"SLURM_JOB_ID": "777", "SLURM_NODEID": "3", "SLURM_PROCID": "5", "RANK": "5", "WORLD_SIZE": "8"}
    done = train(tmp_path, BOSTON, env=local_env(tmp_path, **outer))
    assert done.returncode == 0, done.stderr
    trainer = yaml.safe_load((tmp_path / "runs/regression/boston-gal-s0/config.yaml").read_text())["trainer"]
    assert str(trainer["node_rank"]) == "0" and trainer["world_size"] == 1  # node_rank reads SLURM_NODEID


# ------------------------------------------------------------------------------------------- Slurm
STAND_INS = {
    "srun": "#!/bin/sh\nexit 0\n",
    # sbatch: keep the batch script it was given and answer as Slurm does
    "sbatch": '#!/bin/sh\nfor last; do :; done\ncp "$last" "$SBATCH_RECORD"\necho "Submitted batch job 4242"\n',
}


# A one-node Slurm on this machine, enough for submitit: sbatch runs the batch script in the background as
# job 4242 (or the next id), srun runs its command as task 0 with Slurm's variables and log files, sacct
# reports the state the script left.
FAKE_SLURM = {
    "sbatch": """#!/bin/bash
for last; do :; done
id=$(( $(cat "$FAKE_SLURM/last_id" 2>/dev/null || echo 4241) + 1 )); echo $id > "$FAKE_SLURM/last_id"
echo RUNNING > "$FAKE_SLURM/$id"
( export SLURM_JOB_ID=$id SLURM_JOB_NUM_NODES=1 SLURM_JOB_NODELIST=localhost SLURM_NTASKS=1
  bash "$last" && echo COMPLETED > "$FAKE_SLURM/$id" || echo FAILED > "$FAKE_SLURM/$id" ) >/dev/null 2>&1 &
echo "Submitted batch job $id"
""",
    "srun": """#!/bin/bash
while [[ $1 == --* ]]; do case $1 in --output) out=$2; shift 2;; --error) err=$2; shift 2;; *) shift;; esac; done
out=${out//%j/$SLURM_JOB_ID}; out=${out//%t/0}; err=${err//%j/$SLURM_JOB_ID}; err=${err//%t/0}
SLURM_PROCID=0 SLURM_LOCALID=0 SLURM_NODEID=0 exec "$@" >>"$out" 2>>"${err:-$out}"
""",
    "sacct": """#!/bin/bash
for last; do :; done
echo "JobID|State|NodeList"
for id in ${last//,/ }; do echo "$id|$(cat "$FAKE_SLURM/$id" 2>/dev/null || echo PENDING)|localhost"; done
""",
}


@pytest.mark.slow
def test_a_stage_runs_as_a_slurm_job_and_its_mlflow_run_names_the_job(tmp_path, monkeypatch):
    bin_dir, state = tmp_path / "bin", tmp_path / "slurm"
    for directory in (bin_dir, state):
        directory.mkdir()
    for name, text in FAKE_SLURM.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (tmp_path / "cluster.yaml").write_text("partition: gpu\ntime_min: 30\nsignal_delay_s: 60\n")
    write_boston(tmp_path)
    with mlflow_server(tmp_path / "store") as uri:
        env = local_env(tmp_path, GAL_LAUNCHER="slurm", MLFLOW_TRACKING_URI=uri, FAKE_SLURM=str(state),
                        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
        done = train(tmp_path, BOSTON, env=env, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "submitted slurm job 4242" in done.stdout and "job 4242 finished" in done.stdout
        (run,) = runs_of(uri, "regression")
    assert run.info.status == "FINISHED" and (tmp_path / "runs/regression/boston-gal-s0/metrics.json").exists()
    assert (run.data.tags["job_launcher"], run.data.tags["job_id"], run.data.tags["job_nodes"]) == (
        "slurm", "4242", "localhost")
    script = (tmp_path / FOLDER / "regression/boston-gal-s0/4242_submission.sh").read_text()
    assert "#SBATCH --requeue" in script and "#SBATCH --ntasks-per-node=1" in script and "gpus" not in script


@pytest.fixture
def slurm(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in STAND_INS.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SBATCH_RECORD", str(tmp_path / "batch.sh"))
    monkeypatch.setenv("GAL_LAUNCHER", "slurm")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    monkeypatch.setenv("GAL_CLUSTER_CONFIG", str(tmp_path / "cluster.yaml"))
    (tmp_path / "cluster.yaml").write_text(
        "partition: gpu\naccount: lab\ntime_min: 720\ncpus_per_gpu: 10\nmem_gb_per_gpu: 60\nsignal_delay_s: 240\n"
        "setup: [module load cuda, source .venv/bin/activate]\nsbatch: {exclude: node7}\n")
    return tmp_path


def trainer(gpus: int, nodes: int, device: str = "auto"):
    return train_config("experiment=cifar100_sgd_gal", f"trainer.gpus={gpus}", f"trainer.nodes={nodes}",
                        f"trainer.device={device}").trainer


def test_the_slurm_batch_script_of_a_2_node_4_gpu_run(slurm):
    config = cluster.load_config(slurm, "slurm")
    ex = cluster.executor("slurm", config, trainer(4, 2), slurm / "jobs", "cifar100_sgd-gal-s0")
    job = ex.submit(cluster.TrainingJob(["experiment=cifar100_sgd_gal", "trainer.gpus=4", "trainer.nodes=2"], "/x"))
    assert job.job_id == "4242"
    script = (slurm / "batch.sh").read_text().splitlines()
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --cpus-per-task=10", "#SBATCH --mem=240GB", "#SBATCH --time=720",
                 "#SBATCH --signal=USR2@240", "#SBATCH --requeue", "#SBATCH --partition=gpu", "#SBATCH --account=lab",
                 "#SBATCH --exclude=node7", "#SBATCH --job-name=cifar100_sgd-gal-s0", "module load cuda",
                 "source .venv/bin/activate"):
        assert line in script, line
    command = script[-1] if script[-1] else script[-2]
    assert command.startswith("srun") and "-m submitit.core._submit" in command and "torchrun" not in command
    cpu = cluster.executor("slurm", config, trainer(1, 1, "cpu"), slurm / "cpu", "boston-gal-s0")
    cpu.submit(cluster.TrainingJob(["experiment=boston_gal"], "/x"))
    assert not any("gpus" in line for line in (slurm / "batch.sh").read_text().splitlines())


@pytest.mark.parametrize("setup, message", [
    ({"GAL_LAUNCHER": "kubernetes"}, "GAL_LAUNCHER='kubernetes': use one of local, slurm, submitit-local"),
    ({"MLFLOW_TRACKING_URI": "sqlite:///mlflow.db"}, "sqlite is a store for one machine"),
    ({"cluster.yaml": "partition: gpu\nnodes: 2\n"}, "cluster.yaml: unknown key nodes"),
    ({"cluster.yaml": "partition: gpu\ntime_min: 0\n"}, "cluster.yaml: time_min=0: use a positive integer"),
    ({"cluster.yaml": "partition: gpu\nsetup: module load cuda\n"}, "setup='module load cuda': use a list of"),
    ({"cluster.yaml": "account: lab\n"}, "cluster.yaml: set partition"),
    ({"cluster.yaml": "partition: gpu\ntime_min: 2\nsignal_delay_s: 300\n"}, "signal_delay_s=300 leaves no time"),
    ({"cluster.yaml": "partition: [gpu\n"}, "cluster.yaml is not YAML"),
    ({"cluster.yaml": None}, "GAL_LAUNCHER=slurm needs"),
    ({"PATH": "/nonexistent"}, "srun is not on PATH"),
])
def test_bad_cluster_settings_are_refused_before_submitting(slurm, monkeypatch, setup, message):
    for key, value in setup.items():
        if key == "cluster.yaml":
            (slurm / key).unlink()
            if value is not None:
                (slurm / key).write_text(value)
        else:
            monkeypatch.setenv(key, value)
    write_boston(slurm)
    with pytest.raises(ConfigError, match=re.escape(message)):
        regression.run(train_config(BOSTON, f"root={slurm}"))
    assert not (slurm / "batch.sh").exists() and not (slurm / "runs").exists() and not (slurm / "logs").exists()


@pytest.mark.parametrize("folder, blocker, message", [
    pytest.param("jobs", "jobs", "folder='jobs': the job folder {root}/jobs is a file;", id="a-file"),
    pytest.param("jobs/submitit", "jobs", "folder='jobs/submitit': the job folder {root}/jobs/submitit lies below "
                 "the file {root}/jobs;", id="below-a-file"),
    pytest.param("/dev/null/submitit", None, "folder='/dev/null/submitit': the job folder /dev/null/submitit lies "
                 "below the file /dev/null;", id="absolute-below-a-device"),
    pytest.param("logs/submitit", "logs/submitit/regression", "folder='logs/submitit': the job folder "
                 "{root}/logs/submitit/regression/boston-gal-s0 lies below the file {root}/logs/submitit/regression;",
                 id="the-runs-own-folder-blocked"),
])
def test_an_unusable_job_folder_is_refused_before_submitting(slurm, folder, blocker, message):
    (slurm / "cluster.yaml").write_text(f"partition: gpu\nfolder: {folder}\n")
    if blocker is not None:
        (slurm / blocker).parent.mkdir(parents=True, exist_ok=True)
        (slurm / blocker).write_text("not a folder\n")
    write_boston(slurm)
    with pytest.raises(ConfigError, match=re.escape(message.format(root=slurm))):
        regression.run(train_config(BOSTON, f"root={slurm}"))
    assert not (slurm / "batch.sh").exists() and not (slurm / "runs").exists()
    assert blocker is None or (slurm / blocker).read_text() == "not a folder\n"


def test_an_unwritable_job_folder_is_one_line_from_the_stage_command(slurm):
    """A job folder in a directory this user cannot write: the stage's one line, exit 2, nothing submitted."""
    (slurm / "cluster.yaml").write_text("partition: gpu\nfolder: locked/submitit\n")
    (slurm / "locked").mkdir(mode=0o555)
    write_boston(slurm)
    try:
        done = subprocess.run([*without_root_override(), *train_cmd(slurm, BOSTON)], cwd=ROOT, capture_output=True,
                              text=True, timeout=300)
    finally:
        (slurm / "locked").chmod(0o755)
    assert done.returncode == 2 and done.stderr == (
        f"train regression: bad config: {slurm}/cluster.yaml: folder='locked/submitit': cannot write in "
        f"{slurm}/locked to make the job folder {slurm}/locked/submitit; set folder to a writable directory every "
        "node sees\n"), done.stderr
    assert not (slurm / "batch.sh").exists() and not list((slurm / "locked").iterdir())


def test_a_bad_cluster_setting_is_one_line_from_the_stage_command(slurm):
    (slurm / "cluster.yaml").write_text("partition: gpu\nnodes: 2\n")
    write_boston(slurm)
    done = train(slurm, BOSTON)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("train regression: bad config: ") and "unknown key nodes" in done.stderr


def test_submitit_local_refuses_several_nodes():
    with pytest.raises(ConfigError, match="runs on this machine only"):
        cluster.executor("submitit-local", cluster.ClusterConfig(), trainer(1, 2, "cpu"), Path("/tmp"), "x")


LOADER = """
import time
from torch.utils.data import DataLoader, Dataset
from pipelines.training.launch import worker_init

class StuckReads(Dataset):  # a worker blocked in I/O, where torch's own watchdog cannot look
    def __len__(self):
        return 100

    def __getitem__(self, i):
        time.sleep(0 if i < 2 else 600)
        return i

if __name__ == "__main__":
    loader = DataLoader(StuckReads(), num_workers=2, persistent_workers=True, worker_init_fn=worker_init)
    batches = iter(loader)
    next(batches), next(batches)
    print(" ".join(str(w.pid) for w in batches._workers), flush=True)
    time.sleep(600)
"""


def alive(pid: int) -> bool:
    try:
        return "\\nState:\\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


def test_dataloader_workers_end_with_a_killed_training_process(tmp_path):
    (tmp_path / "loader.py").write_text(LOADER)
    trainer = subprocess.Popen([sys.executable, tmp_path / "loader.py"], cwd=ROOT, stdout=subprocess.PIPE,
                               text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    workers = [int(pid) for pid in trainer.stdout.readline().split()]
    assert len(workers) == 2 and all(map(alive, workers))
    trainer.kill()  # what scancel or a pre-emption does to the training process
    trainer.wait()
    deadline = time.monotonic() + 10
    while any(map(alive, workers)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(map(alive, workers))
