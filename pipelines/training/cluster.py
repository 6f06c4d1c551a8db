"""Where a training run executes, chosen by the environment so that it never enters a DVC stage's command
(switching launchers reruns no finished stage):

    GAL_LAUNCHER=local           this machine (the default); torchrun for several processes (launch.py)
    GAL_LAUNCHER=slurm           one Slurm job through submitit, set up by cluster.yaml (or GAL_CLUSTER_CONFIG)
    GAL_LAUNCHER=submitit-local  the same job path on this machine (submitit's local executor, one node)

With submitit, the stage process (``python -m pipelines.train ...`` under ``dvc repro``) checks the config,
submits one job of trainer.nodes nodes x trainer.gpus tasks (one task per GPU), waits for it and exits
with its result, so DVC records the stage only when the run finished. Every task runs the training entry
point in-process with torch.distributed set up from the job's environment (submitit's
TorchDistributedEnvironment), not a nested torchrun. The job's MLflow run is tagged job_id and job_nodes.

Pre-emption and time limits: Slurm signals SIGUSR2 ``signal_delay_s`` before the end; submitit then calls
``TrainingJob.checkpoint``, which requeues the job (the same job id); the requeued job resumes from the last
epoch's checkpoint into the same MLflow run (the runner's resume). Work after that checkpoint is redone.

Every setting is checked before anything is submitted, one ConfigError line each; the job folder
(``folder``, relative to the root) must be, or be makeable as, a directory this user can write (not a file,
nor below one), checked without making it.

Attach: ``<folder>/<task>/<run name>/job.json`` keeps the job id. A rerun of a stage whose job is still
pending or running waits for that job instead of submitting a second one; a live job of the same run with
other overrides is refused in one line.
"""
from __future__ import annotations

import importlib
import json
import os
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from pipelines.atomic import nearest_existing, write_atomic
from pipelines.errors import ConfigError, UserError, print_error
from pipelines.tracking.store import check_tracking_server, tracking_uri

LAUNCHERS = ("local", "slurm", "submitit-local")
CONFIG_FILE = "cluster.yaml"  # at the project root, git-ignored: cluster.example.yaml documents it
ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING",
          "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING", "STAGE_OUT", "STOPPED", "PREEMPTED"}


@dataclass(frozen=True)
class ClusterConfig:
    """cluster.yaml: where and how jobs run. Nodes, tasks and GPUs come from each run's trainer.*."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time_min: int = 1440  # one job's wall time; a run longer than that requeues itself and resumes
    cpus_per_gpu: int = 8  # cpus per task (one task per GPU)
    mem_gb_per_gpu: int = 64  # node memory = this x trainer.gpus
    constraint: str | None = None
    signal_delay_s: int = 180  # SIGUSR2 this long before the time limit: time to requeue
    max_requeues: int = 30  # time limits a run may hit before it fails (pre-emptions do not count)
    setup: list[str] = field(default_factory=list)  # shell lines before the job: module load, venv activate
    sbatch: dict = field(default_factory=dict)  # any other sbatch option, e.g. {reservation: r, exclude: n7}
    folder: str = "logs/submitit"  # job scripts, pickles and logs, on a file system every node sees


# a cluster.yaml value, by its default's type (None: an optional name): its check and what to write instead
_VALUES = {int: (lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0, "a positive integer"),
           list: (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of shell lines"),
           dict: (lambda v: isinstance(v, dict), "a mapping"),
           str: (lambda v: isinstance(v, str) and bool(v), "a name")}


def launcher() -> str:
    name = os.environ.get("GAL_LAUNCHER", "local") or "local"
    if name not in LAUNCHERS:
        raise ConfigError(f"GAL_LAUNCHER={name!r}: use one of {', '.join(LAUNCHERS)}")
    return name


def load_config(root: Path, kind: str) -> ClusterConfig:
    """The cluster config (GAL_CLUSTER_CONFIG, else <root>/cluster.yaml), checked; defaults without one
    for submitit-local. Slurm needs the file and its partition."""
    path = Path(os.environ.get("GAL_CLUSTER_CONFIG") or root / CONFIG_FILE)
    if not path.is_file():
        if kind == "slurm":
            raise ConfigError(f"GAL_LAUNCHER=slurm needs {path}: copy cluster.example.yaml there and set your "
                              "partition (or point GAL_CLUSTER_CONFIG at yours)")
        return _checked(ClusterConfig(), root, f"the default folder of {kind} jobs")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not YAML: {str(err).splitlines()[0]}") from None
    known = {f.name: f for f in fields(ClusterConfig)}
    if not isinstance(raw, dict) or set(raw) - set(known):
        extra = sorted(set(raw) - set(known)) if isinstance(raw, dict) else ["(not a mapping)"]
        raise ConfigError(f"{path}: unknown key {extra[0]}; known: {', '.join(known)}")
    for key, value in raw.items():
        default = getattr(ClusterConfig(), key)
        if value is None and default is None:  # an optional setting left out
            continue
        valid, want = _VALUES[type(default) if default is not None else str]
        if not valid(value):
            raise ConfigError(f"{path}: {key}={value!r}: use {want}")
    config = ClusterConfig(**raw)
    if kind == "slurm" and not config.partition:
        raise ConfigError(f"{path}: set partition (the Slurm partition of the GPU nodes)")
    if config.signal_delay_s >= 60 * config.time_min:
        raise ConfigError(f"{path}: signal_delay_s={config.signal_delay_s} leaves no time before the time "
                          f"limit of {config.time_min} min")
    return _checked(config, root, f"{path}: folder={config.folder!r}")


def _checked(config: ClusterConfig, root: Path, setting: str) -> ClusterConfig:
    check_folder(root / config.folder, setting)
    return config


def check_folder(folder: Path, setting: str) -> None:
    """ConfigError unless ``folder`` is, or can be made, a directory this process writes in (what of its path
    exists is a directory, the deepest part writable); nothing is made: submitit makes it when it submits."""
    existing = nearest_existing(folder)
    if not existing.is_dir():
        what = ("is a file" if existing.is_file() else "is not a directory") \
            if existing == Path(os.path.abspath(folder)) else f"lies below the file {existing}"
        raise ConfigError(f"{setting}: the job folder {folder} {what}; set folder to a directory every node sees")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{setting}: cannot write in {existing} to make the job folder {folder}; set folder to "
                          "a writable directory every node sees")


def refuse_local_store(kind: str) -> None:
    """Slurm jobs write from many nodes: an sqlite file (or a local file store) is for one machine."""
    uri = tracking_uri()
    if kind == "slurm" and (uri.startswith(("sqlite:", "file:")) or "://" not in uri):
        raise ConfigError(f"GAL_LAUNCHER=slurm writes runs from many nodes, and {uri.split('://')[0]} is a store "
                          "for one machine: set MLFLOW_TRACKING_URI to a tracking server (README: A team server)")


def executor(kind: str, config: ClusterConfig, trainer, folder: Path, name: str):
    """The submitit executor of one run: trainer.nodes nodes x trainer.gpus tasks, a GPU per task."""
    import submitit

    nodes, tasks = int(trainer.nodes), int(trainer.gpus)
    gpus = 0 if str(trainer.device) == "cpu" else tasks
    if kind == "submitit-local":
        if nodes > 1:
            raise ConfigError(f"trainer.nodes={nodes}: GAL_LAUNCHER=submitit-local runs on this machine only")
        ex = submitit.LocalExecutor(folder, max_num_timeout=config.max_requeues)
        ex.update_parameters(timeout_min=config.time_min, tasks_per_node=tasks, gpus_per_node=gpus,
                             signal_delay_s=config.signal_delay_s, setup=config.setup)
        return ex
    try:
        ex = submitit.SlurmExecutor(folder, max_num_timeout=config.max_requeues)
    except RuntimeError:
        raise ConfigError("GAL_LAUNCHER=slurm but srun is not on PATH: run from a Slurm login node") from None
    options = {"partition": config.partition, "account": config.account, "qos": config.qos,
               "constraint": config.constraint}
    ex.update_parameters(
        job_name=name, time=config.time_min, nodes=nodes, ntasks_per_node=tasks, cpus_per_task=config.cpus_per_gpu,
        mem=f"{config.mem_gb_per_gpu * tasks}GB", signal_delay_s=config.signal_delay_s, setup=config.setup,
        **({"gpus_per_node": gpus} if gpus else {}), **{k: v for k, v in options.items() if v},
        additional_parameters={"requeue": True, **config.sbatch})  # requeue: also where JobRequeue=0
    return ex


class TrainingJob:
    """What every task of a job runs: the training entry point with this run's overrides, in-process."""

    def __init__(self, argv: list[str], cwd: str):
        self.argv, self.cwd = list(argv), cwd

    def __call__(self) -> str | None:
        """None when the run finished (or recorded its divergence); a user error's one line otherwise."""
        from submitit.helpers import TorchDistributedEnvironment

        from pipelines.config import compose

        os.chdir(self.cwd)
        os.environ["GAL_LAUNCHER"] = "local"  # this is the job: run here
        # each task keeps every GPU of its node visible and takes its local rank's (launch.setup)
        TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        cfg = compose("train", self.argv)
        try:
            importlib.import_module(f"pipelines.tasks.{cfg.task.name}.task").run(cfg)
        except UserError as err:
            print(f"train {cfg.task.name}: {err.prefix}{err}", file=sys.stderr, flush=True)
            return f"{err.prefix}{err}"
        return None

    def checkpoint(self, *args, **kwargs):
        """On pre-emption or the time limit: requeue the same run; it resumes from its last checkpoint."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(TrainingJob(self.argv, self.cwd))


def job_tags() -> dict[str, str]:
    """The MLflow tags of a run inside a submitit job (none outside one)."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return {}
    from submitit import JobEnvironment

    env = JobEnvironment()
    return {"job_launcher": env.cluster, "job_id": str(env.job_id), "job_nodes": ",".join(env.hostnames)}


def _alive(kind: str, folder: Path, job_id: str) -> bool:
    if kind == "submitit-local":  # the job id is the pid of submitit's controller on this machine
        try:
            cmdline = Path(f"/proc/{int(job_id)}/cmdline").read_bytes()
        except (OSError, ValueError):
            return False
        return b"submitit" in cmdline
    import submitit

    state = submitit.SlurmJob(folder, job_id).state.split()[0].upper() if job_id else "UNKNOWN"
    if state == "UNKNOWN":
        raise ConfigError(f"cannot tell whether Slurm job {job_id} of this run is still queued (sacct does not "
                          f"know it): scancel it if it is, then delete {folder / 'job.json'}")
    return state in ACTIVE


def _wait(kind: str, job, folder: Path):
    """Rank 0's result once the job ended (submitit raises when a task crashed)."""
    if kind == "submitit-local" and getattr(job, "_process", None) is None:  # attached: no process handle
        while _alive(kind, folder, job.job_id):
            time.sleep(1)
    return job.results()[0]  # waits (for a Slurm job, submitit asks sacct more and more rarely, up to every 10 min)


def submit(cfg, task_cls, argv: list[str], run_name: str) -> int:
    """Submit this run as a job (or attach to its live one), wait, and return the stage's exit code."""
    import submitit

    kind = launcher()
    root = Path(cfg.root).resolve()
    config = load_config(root, kind)
    refuse_local_store(kind)
    folder = root / config.folder / task_cls.name / run_name
    check_folder(folder, f"folder={config.folder!r}")  # a stale file in the way of this run's own folder
    record = folder / "job.json"
    previous = json.loads(record.read_text()) if record.is_file() else None
    job = None
    if previous and previous["launcher"] == kind and _alive(kind, folder, previous["job_id"]):
        if previous["argv"] != list(argv):
            raise ConfigError(f"job {previous['job_id']} of run {run_name} is still running with other overrides "
                              f"({' '.join(previous['argv'])}): wait for it or cancel it first")
        job_class = submitit.SlurmJob if kind == "slurm" else submitit.LocalJob
        job = job_class(folder, previous["job_id"], tasks=range(cfg.trainer.nodes * cfg.trainer.gpus))
        print(f"{run_name}: attached to its {kind} job {job.job_id}, still running", flush=True)
    if job is None:
        ex = executor(kind, config, cfg.trainer, folder, run_name)
        check_tracking_server(tracking_uri())  # a store that is down or refuses us: before the job waits in a queue
        with submitit.helpers.clean_env():  # an outer allocation's SLURM_* must not shape the new job
            job = ex.submit(TrainingJob(argv, os.getcwd()))
        write_atomic(record, json.dumps({"launcher": kind, "job_id": str(job.job_id), "argv": list(argv)}) + "\n")
        print(f"{run_name}: submitted {kind} job {job.job_id} ({cfg.trainer.nodes} node(s) x {cfg.trainer.gpus} "
              f"task(s)); logs in {folder}", flush=True)
    try:
        error = _wait(kind, job, folder)
    except KeyboardInterrupt:
        if kind != "slurm":  # a local job is in this terminal's process group: Ctrl-C stopped it too
            raise
        print(f"{run_name}: stopped waiting; Slurm job {job.job_id} goes on (rerun the stage to wait for it "
              f"again, scancel {job.job_id} to stop it)", file=sys.stderr)
        return 130
    except (submitit.core.utils.FailedJobError, submitit.core.utils.UncompletedJobError) as err:
        last = [line for line in str(err).splitlines() if line.strip()]
        print(f"train {task_cls.name}: job {job.job_id} of {run_name} failed: {last[-1] if last else err}; "
              f"logs in {folder}", file=sys.stderr)
        return 1
    if error:
        return print_error(f"train {task_cls.name}", UserError(f"job {job.job_id}: {error}"))
    print(f"{run_name}: job {job.job_id} finished", flush=True)
    return 0
