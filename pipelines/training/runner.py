"""The one training runtime of every task: check the config, submit it as a cluster job (cluster.py,
GAL_LAUNCHER) or relaunch it under torchrun, set up processes and determinism, decide and send a resume,
run the epoch loop with per-epoch atomic checkpoints, and track the run (MLflow + run record) on rank 0
with one progress line per epoch.

A task supplies only what is its own, as a ``Task`` subclass (pipelines/tasks/classification/task.py and
regression/task.py are the models): building the model, adjuster, optimiser and data in ``__init__``, one
training epoch, evaluation, the final metrics and its state; pipelines/training/epoch.py has the epoch's
bookkeeping. ``python -m pipelines.train`` calls the task module's ``run(cfg)``, which calls
``runner.run(cfg, <its Task>)``.

Resume (the rule: pipelines/CONTRACT.md, Resume): a rerun of the same config after a crash or kill continues
from the last checkpoint in the same MLflow run and ends with the metrics of an uninterrupted run (bitwise on
CPU with deterministic algorithms). Only rank 0 reads the checkpoint (only node 0 has it); it sends the
tensors one by one with ``dist.broadcast`` (on the GPU under NCCL) after a small skeleton of everything else,
so no rank ever holds a pickled copy of the whole state.

Divergence: ``trainer.on_divergence`` (fail or record); the rule: pipelines/CONTRACT.md, Divergence.

Preflight: pipelines/training/rehearsal.py is this runner's mode that builds a run's Task as ``fit`` does and
exercises it for a few steps with nothing recorded (``make preflight``).
"""
from __future__ import annotations

import contextlib
import importlib
import os
import sys
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from pipelines.config import first_nonfinite_setting
from pipelines.errors import ConfigError
from pipelines.training import checkpoint, cluster, identity, launch, method
from pipelines.tracking.record import first_nonfinite
from pipelines.tracking.resume import Resume, config_digest, decide, recorded_run_id
from pipelines.tracking.run import RunTracker, changed_since_state
from pipelines.tracking import store
from pipelines.tracking.store import check_tracking_server, tracking_uri

PROGRESS_SECONDS = 10.0  # at most one progress line this often (and always after the first and last epoch)


class Task(ABC):
    """What a task supplies to the runner. ``__init__(cfg, procs)`` builds everything the run holds."""

    name: str  # the MLflow experiment and runs/<name>/, checkpoints/<name>/
    data_files: list[Path]  # inputs whose checksums the run records

    @classmethod
    def check(cls, cfg: DictConfig, world: int) -> None:
        """Refuse a bad task setting before any process starts or any data is read (ConfigError)."""

    @abstractmethod
    def describe(self) -> str:
        """One line for the start of the run: sizes, parameter counts."""

    @abstractmethod
    def train_epoch(self, epoch: int) -> dict[str, float]:
        """Train one epoch (1-based); the history row's training columns."""

    @abstractmethod
    def evaluate(self, epoch: int) -> dict[str, float]:
        """The history row's evaluation columns."""

    @abstractmethod
    def final_metrics(self, last_row: dict[str, float]) -> dict[str, float]:
        """The run's final metrics (metrics.json), given the last history row."""

    @abstractmethod
    def progress(self, row: dict[str, float]) -> str:
        """The few numbers of the epoch's progress line."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs: tensors and plain values only (loaded with weights_only=True)."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def task_class(name: str) -> type[Task]:
    """The Task that pipelines/tasks/<name>/task.py defines."""
    module = importlib.import_module(f"pipelines.tasks.{name}.task")
    return next(v for v in vars(module).values()
                if isinstance(v, type) and issubclass(v, Task) and v.__module__ == module.__name__)


# ------------------------------------------------------------------------------------------ checks
def require_int(cfg: DictConfig, key: str, minimum: int) -> int:
    """cfg's integer at ``key``, refused in one line unless it is an integer of at least ``minimum``."""
    value = OmegaConf.select(cfg, key)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key}={value!r}: use an integer of at least {minimum}")
    return value


def check(cfg: DictConfig, task: type[Task], here: bool = True) -> int:
    """The settings every run shares, then the task's; the world size. All before any compute. With
    ``here`` false (a job submitted elsewhere) the devices of this machine are not asked."""
    require_int(cfg, "seed", 0)
    require_int(cfg, "task.epochs", 1)
    require_int(cfg, "task.threads", 0)
    identity.preset_overrides(cfg)  # every run starts from a preset
    found = first_nonfinite_setting(OmegaConf.to_container(cfg, resolve=True))
    if found:  # no setting means anything as NaN or infinity (eps=inf would fail only in the first step)
        raise ConfigError(f"{found[0]}={found[1]}: use a finite number")
    trainer = cfg.trainer
    gpus, nodes = require_int(cfg, "trainer.gpus", 1), require_int(cfg, "trainer.nodes", 1)
    device = launch.device_type(trainer) if here else launch.device_choice(trainer)
    if device == "cpu" and str(trainer.device) == "auto" and gpus * nodes > 1:
        raise ConfigError(f"trainer.gpus={gpus} but torch sees no CUDA device; set trainer.device=cpu to run "
                          f"{gpus} CPU processes, or trainer.gpus=1")
    if device == "cuda" and here and gpus > torch.cuda.device_count():
        raise ConfigError(f"trainer.gpus={gpus} but this node has {torch.cuda.device_count()} GPUs")
    if str(trainer.precision) not in launch.PRECISIONS:
        raise ConfigError(f"trainer.precision={trainer.precision!r}: use {', '.join(launch.PRECISIONS)}")
    if str(trainer.channels_last) not in ("auto", "True", "False"):
        raise ConfigError(f"trainer.channels_last={trainer.channels_last!r}: use auto, true or false")
    if str(trainer.on_divergence) not in ("fail", "record"):
        raise ConfigError(f"trainer.on_divergence={trainer.on_divergence!r}: use fail or record")
    if str(trainer.compile) not in ("auto", "True", "False"):
        raise ConfigError(f"trainer.compile={trainer.compile!r}: use auto, true or false")
    if str(trainer.system_metrics) not in ("auto", "True", "False"):
        raise ConfigError(f"trainer.system_metrics={trainer.system_metrics!r}: use auto, true or false")
    if nodes > 1 and here:  # a job's nodes rendezvous through its scheduler
        launch.check_nodes(trainer)
    method.check(cfg)
    task.check(cfg, gpus * nodes)
    return gpus * nodes


def diverged_on_rank0(row: dict[str, float], procs: launch.Processes) -> bool:
    """Whether rank 0's row holds a NaN/inf, on every rank: only rank 0 has every metric (detection's val_*),
    and all ranks must stop after the same epoch."""
    flag = torch.tensor([float(procs.main and first_nonfinite(row) is not None)], device=procs.device)
    return launch.all_reduce_sum(flag, procs).item() > 0


def resolved_config(cfg: DictConfig, procs: launch.Processes) -> dict[str, Any]:
    """The run's config as recorded: what actually ran beside what was asked for (device and precision auto,
    gpus x nodes)."""
    config = OmegaConf.to_container(cfg, resolve=True)
    config["trainer"].update(resolved_device=procs.device.type, world_size=procs.world,
                             resolved_precision=launch.precision(cfg.trainer, procs.device.type),
                             resolved_compile=launch.compiled_step(cfg.trainer))
    return config


def checkpoint_state(epoch: int, config_sha: str, config: dict, task: Task, tracker: dict,
                     final: dict[str, float] | None = None) -> dict[str, Any]:
    """What a checkpoint after ``epoch`` holds; after the last, the run's final metrics too, so a run killed
    before its record was written is finished from it (resume.decide)."""
    return {"epoch": epoch, "config_sha": config_sha, "config": config, "task": task.state_dict(),
            "tracker": tracker, "final": final}


# ------------------------------------------------------------------------------------------ the run
def configure_torch(cfg: DictConfig) -> None:
    """This process's torch settings for the run: CPU threads, deterministic algorithms or cuDNN autotuning."""
    if cfg.task.threads:
        torch.set_num_threads(cfg.task.threads)
    if cfg.task.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # what deterministic cuBLAS needs
    torch.use_deterministic_algorithms(bool(cfg.task.deterministic))
    torch.backends.cudnn.benchmark = not cfg.task.deterministic


def run(cfg: DictConfig, task: type[Task]) -> None:
    if cluster.launcher() != "local":  # submit a job that runs this again on its nodes, and wait for it
        check(cfg, task, here=False)
        sys.exit(cluster.submit(cfg, task, sys.argv[1:], identity.run_name(cfg, identity.variant(cfg))))
    world = check(cfg, task)
    variant = identity.variant(cfg)  # composes the preset: a config error shows before any process starts
    if not launch.under_torchrun() or os.environ.get("RANK") == "0":
        check_tracking_server(tracking_uri())  # before any data is read
    if world > 1 and not launch.under_torchrun():
        sys.exit(launch.relaunch(cfg.trainer))
    configure_torch(cfg)
    procs = launch.setup(cfg.trainer)
    try:
        fit(cfg, task, procs, variant)
    finally:
        launch.teardown()


def fit(cfg: DictConfig, task_cls: type[Task], procs: launch.Processes, variant: str) -> None:
    """Train and record the run, rank 0 holding its lock throughout: one process at a time owns a run."""
    name = identity.run_name(cfg, variant)
    ckpt_dir = Path(cfg.root) / "checkpoints" / task_cls.name / name
    if procs.main:  # before any compute, not when the record is due
        checkpoint.check_writable(Path(cfg.root) / "runs" / task_cls.name)
    with checkpoint.run_lock(ckpt_dir, name) if procs.main else contextlib.nullcontext():
        _fit(cfg, task_cls, procs, variant, name, ckpt_dir)


def _fit(cfg: DictConfig, task_cls: type[Task], procs: launch.Processes, variant: str, name: str,
         ckpt_dir: Path) -> None:
    root = Path(cfg.root)
    config = resolved_config(cfg, procs)
    config_sha = config_digest(config)  # what its checkpoints say they hold
    ckpt_path, record_dir = ckpt_dir / "last.pt", root / "runs" / task_cls.name / name
    # rank 0 decides and sends the checkpoint: only node 0 has it, and other nodes' configs may differ (root)
    saved, decision, data = None, None, []
    if procs.main:
        saved = checkpoint.load(ckpt_path)
        decision = decide(saved, config, cfg.task.epochs, where=str(ckpt_path),
                          recorded=recorded_run_id(record_dir))
        if decision.finish:  # a finished run of other code, data or environment: DVC reruns the stage for that
            data = [store.project_root() / path for path in saved["tracker"]["record"]["data_checksums"]]
            changed = changed_since_state(saved["tracker"], data, cfg.profile, root / "runs")
            if changed:
                decision = Resume(False, 1, f"holds a finished run whose {' and '.join(changed)} differ")
        if saved is not None and not decision.resume and not decision.finish:
            print(f"starting {name} over: {ckpt_path} {decision.reason}", flush=True)
    tracking = dict(profile=cfg.profile, runs_root=root / "runs", variant=variant, tags=cluster.job_tags(),
                    source="pipelines/train.py", journal=ckpt_dir / "history.jsonl", exclusive=True)
    if launch.all_reduce_sum(torch.tensor([float(procs.main and decision.finish)], device=procs.device),
                             procs).item() > 0:
        if procs.main:  # the training is done: only the record is missing (the data it read is checked)
            with RunTracker(task_cls.name, name, config, data_files=data, resume=saved["tracker"],
                            **tracking) as tracker:
                tracker.log_final(saved["final"])
            print(f"{name}: {ckpt_path} {decision.reason}: recorded it from the checkpoint", flush=True)
        return
    saved = launch.broadcast_state(saved if decision is not None and decision.resume else None, procs)
    task = task_cls(cfg, procs)
    start, resume = 1, None
    if saved is not None:
        task.load_state_dict(saved["task"])
        start, resume = saved["epoch"] + 1, saved["tracker"]
        if procs.main:
            print(f"resuming {name} after epoch {saved['epoch']} from {ckpt_path}", flush=True)
    if procs.main:
        print(f"{name}: {task.describe()}; {procs.world} process(es) on {procs.device}", flush=True)
    system_metrics = str(cfg.trainer.system_metrics)
    tracker = (RunTracker(task.name, name, config, data_files=task.data_files, resume=resume, **tracking,
                          system_metrics=system_metrics == "True" or (
                              system_metrics == "auto" and procs.device.type == "cuda"))
               if procs.main else contextlib.nullcontext())
    last_print, diverged, final = 0.0, None, None
    record_divergence = str(cfg.trainer.on_divergence) == "record"
    with tracker:
        for epoch in range(start, cfg.task.epochs + 1):
            row = task.train_epoch(epoch)
            row.update(task.evaluate(epoch))
            if record_divergence and diverged_on_rank0(row, procs):
                diverged = tracker.log_diverged(epoch, row) if procs.main else None
                break
            if not procs.main:
                continue
            tracker.log_epoch(epoch, row)  # refuses NaN/inf: with on_divergence=fail a diverged run fails loudly
            final = task.final_metrics(row) if epoch == cfg.task.epochs else None
            checkpoint.save(checkpoint_state(epoch, config_sha, config, task, tracker.state(), final), ckpt_path)
            if epoch in (start, cfg.task.epochs) or time.monotonic() - last_print >= PROGRESS_SECONDS:
                print(f"epoch {epoch}/{cfg.task.epochs} {task.progress(row)}", flush=True)
                last_print = time.monotonic()
        if procs.main and diverged is None:
            tracker.log_final(final)
    if diverged is not None:  # the record is written: a rerun starts over rather than diverge again from here
        ckpt_path.unlink(missing_ok=True)
        (ckpt_dir / "history.jsonl").unlink(missing_ok=True)
        metric, value = diverged
        print(f"{name} diverged at epoch {epoch} ({metric} = {value}): recorded as a result "
              f"(trainer.on_divergence=record)", flush=True)
