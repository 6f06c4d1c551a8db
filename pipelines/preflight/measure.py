"""One planned run, rehearsed: its stage's config with the preflight's few changes, through the runner's
preflight mode (pipelines/training/rehearsal.py), in this process at world size 1 or under torchrun at its
real world size (the same launcher as training). Out of memory halves the per-device batch until it fits.

The changes, and only these: ``root`` (the scratch root holding the data), ``trainer.device``, ``trainer.gpus``
(the processes it runs on here), ``trainer.nodes=1``, the global ``task.batch_size`` (the per-device batch
times those processes), ``task.eval_batch_size`` (the config's, or ``--batch-per-device``), and random init
instead of pretrained weights with ``--random-init`` (``random_init``).

    python -m torch.distributed.run --standalone --nproc_per_node=4 -m pipelines.preflight.measure spec.json
"""
from __future__ import annotations

import dataclasses
import gc
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from pipelines.config import compose
from pipelines.errors import UserError
from pipelines.training import launch, runner
from pipelines.training.rehearsal import Measured, rehearse

PRETRAINED_KEYS = ("model.pretrained", "model.pretrained_backbone")


@dataclass
class Setting:
    """How one planned run is rehearsed here."""

    overrides: list[str]        # the stage's own train overrides
    device: str                 # cpu | cuda
    world: int                  # processes it runs on here
    batch: int | None           # per-device training batch (None: a task without a loader)
    eval_batch: int | None      # per-device evaluation batch (None: a task without a loader)
    init: list[str]             # random_init(cfg) with --random-init, else none
    root: str

    def all_overrides(self) -> list[str]:
        extra = [f"root={self.root}", f"trainer.device={self.device}", f"trainer.gpus={self.world}", "trainer.nodes=1"]
        if self.batch is not None:
            extra.append(f"task.batch_size={self.batch * self.world}")
        if self.eval_batch is not None:
            extra.append(f"task.eval_batch_size={self.eval_batch}")
        return [*self.overrides, *extra, *self.init]


def random_init(cfg: DictConfig) -> list[str]:
    """The overrides that give ``cfg``'s model random weights where it loads pretrained ones."""
    return [f"{key}=false" for key in PRETRAINED_KEYS if OmegaConf.select(cfg, key)]


@dataclass
class Outcome:
    """What rehearsing one run gave: a measurement, a one-line failure, or both (out of memory at the real
    batch, measured at the largest that fits)."""

    measured: Measured | None = None
    error: str | None = None    # one line
    oom: bool = False


def is_oom(err: BaseException) -> bool:
    return isinstance(err, (torch.OutOfMemoryError, MemoryError)) or "can't allocate memory" in str(err)


def one_line(err: BaseException) -> str:
    if isinstance(err, UserError):
        return f"{err.prefix}{err}"
    first = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {first}"[:240]


def checked(overrides: list[str]) -> tuple[DictConfig, type[runner.Task]]:
    """The run's config and Task, checked as the runner checks them, with this process's torch settings."""
    cfg = compose("train", overrides)
    task_cls = runner.task_class(cfg.task.name)
    runner.check(cfg, task_cls)
    runner.configure_torch(cfg)
    return cfg, task_cls


def rehearse_here(setting: Setting, steps: int, scratch: Path) -> Outcome:
    """Rehearse ``setting`` in this process (world size 1)."""
    threads = torch.get_num_threads()
    try:
        cfg, task_cls = checked(setting.all_overrides())
        procs = launch.Processes(0, 0, 1, torch.device(setting.device))
        return Outcome(measured=rehearse(cfg, task_cls, procs, steps, scratch))
    except Exception as err:  # one row with its cause; the next run goes on
        return Outcome(error="out of memory" if is_oom(err) else one_line(err), oom=is_oom(err))
    finally:
        torch.set_num_threads(threads)
        gc.collect()  # the task, its loaders' workers and its device memory go before the next run
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def rehearse_under_torchrun(setting: Setting, steps: int, scratch: Path) -> Outcome:
    """Rehearse ``setting`` on ``setting.world`` processes under torchrun (NCCL on GPUs, gloo on CPU)."""
    with tempfile.TemporaryDirectory(dir=scratch) as folder:
        spec = Path(folder) / "spec.json"
        spec.write_text(json.dumps({"overrides": setting.all_overrides(), "steps": steps, "scratch": str(scratch),
                                    "results": folder}))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={setting.world}",
               "-m", "pipelines.preflight.measure", str(spec)]
        done = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=launch.die_with_parent)
        results = [json.loads(p.read_text()) for p in sorted(Path(folder).glob("rank*.json"))]
    failed = [r for r in results if "error" in r]
    if failed:
        return Outcome(error=failed[0]["error"], oom=any(r["oom"] for r in failed))
    if done.returncode != 0 or not results:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return Outcome(error=f"torchrun exited with {done.returncode}: {tail}"[:240])
    return Outcome(measured=Measured(**results[0]["measured"]))


def measure(setting: Setting, steps: int, scratch: Path) -> Outcome:
    """Rehearse ``setting``; after out of memory, halve the per-device batch until a run fits."""
    attempt = rehearse_under_torchrun if setting.world > 1 else rehearse_here
    outcome = attempt(setting, steps, scratch)
    if not outcome.oom or not setting.batch:
        return outcome
    batch = setting.batch
    while batch > 1:
        batch //= 2
        smaller = attempt(dataclasses.replace(setting, batch=batch), steps, scratch)
        if not smaller.oom:
            fits = f"the largest per-device batch that fits: {batch}" if smaller.error is None else smaller.error
            return Outcome(measured=smaller.measured, oom=True,  # the row shows what ran at that batch
                           error=f"out of memory at per-device batch {setting.batch}; {fits}")
    return Outcome(oom=True, error=f"out of memory at per-device batch {setting.batch}, and at 1")


def worker(spec_path: str) -> int:
    """One rank under torchrun: rehearse and write rank<k>.json (rank 0: the measurement; any rank: its error)."""
    spec = json.loads(Path(spec_path).read_text())
    rank = int(os.environ.get("RANK", 0))
    try:
        cfg, task_cls = checked(spec["overrides"])
        procs = launch.setup(cfg.trainer)
        measured = rehearse(cfg, task_cls, procs, spec["steps"], Path(spec["scratch"]))
        if procs.main:
            (Path(spec["results"]) / "rank0.json").write_text(json.dumps({"measured": dataclasses.asdict(measured)}))
        return 0
    except Exception as err:
        (Path(spec["results"]) / f"rank{rank}.json").write_text(json.dumps({"error": one_line(err), "oom": is_oom(err)}))
        return 1
    finally:
        launch.teardown()


if __name__ == "__main__":
    sys.exit(worker(sys.argv[1]))
