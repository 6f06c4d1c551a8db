"""The runner's preflight mode: one run's Task, built as ``runner.fit`` builds it, exercised for a few steps with
nothing recorded (pipelines/preflight/ calls it for every run of a profile).

    measured = rehearse(cfg, Classification, procs, steps=3, scratch=tmp)

It runs ``steps`` training steps through the task's own ``train_epoch`` (its training loader capped and timed,
not replaced), one evaluation batch through its own ``evaluate`` (COCOeval included), and a checkpoint save
and load as ``fit`` writes and reads one, into ``scratch``. No MLflow run, no run record, nothing under
checkpoints/. A task without a training loader (regression trains on tensors) runs ``steps`` whole epochs
and evaluates its whole test split. Out of memory propagates: the caller decides what to try next.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from omegaconf import DictConfig

from pipelines.tracking.record import first_nonfinite
from pipelines.tracking.resume import config_digest
from pipelines.training import checkpoint, launch
from pipelines.training.runner import Task, checkpoint_state, diverged_on_rank0, resolved_config


@dataclass
class Measured:
    """What one rehearsal measured on rank 0. ``unit`` is "step" (``per_unit`` images per step on this
    device) or "epoch" (a loaderless task: whole epochs)."""

    describe: str
    unit: str
    unit_s: list[float]           # wall time of each step (or epoch), the wait for its batch included
    wait_s: list[float]           # of which waiting for the loader
    per_unit: int                 # images per step on this device (0 for "epoch")
    eval_s: float                 # one evaluation batch (loaderless: the whole evaluation), metrics included
    eval_images: int              # images in that batch on this device (0: the whole evaluation)
    peak_allocated: int | None    # bytes, CUDA
    peak_reserved: int | None     # bytes, CUDA
    peak_rss: int | None          # bytes, CPU: this process's peak resident set
    checkpoint_bytes: int
    checkpoint_s: float           # save and load
    nonfinite: str | None = None  # "train_loss = nan": the first steps diverged (nothing after them ran)

    @property
    def median_s(self) -> float:
        """The median step (or epoch) after the first, which pays for warm-up (cuDNN autotuning, allocation)."""
        timed = self.unit_s[1:] or self.unit_s
        return statistics.median(timed)

    @property
    def images_per_s(self) -> float:
        return self.per_unit / self.median_s


class TimedBatches:
    """A loader's first ``limit`` batches, timed: the wait for each batch and each whole step (from asking
    for its batch to asking for the next, after the device finished the step's work)."""

    def __init__(self, loader, limit: int, device: torch.device):
        self.loader, self.limit, self.device = loader, limit, device
        self.sampler = loader.sampler
        self.wait_s: list[float] = []
        self.step_s: list[float] = []
        self.images: list[int] = []

    def __len__(self) -> int:
        return min(self.limit, len(self.loader))

    def __iter__(self) -> Iterator:
        batches = iter(self.loader)
        for _ in range(len(self)):
            start = time.perf_counter()
            batch = next(batches)
            self.wait_s.append(time.perf_counter() - start)
            self.images.append(len(batch[0]))
            yield batch
            synchronize(self.device)
            self.step_s.append(time.perf_counter() - start)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peaks(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM starts again from the current RSS
    except OSError:
        pass


def peak_rss() -> int | None:
    """This process's peak resident set since ``reset_peaks`` (Linux; None elsewhere)."""
    try:
        line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM"))
    except (OSError, StopIteration):
        return None
    return int(line.split()[1]) * 1024


def rehearse(cfg: DictConfig, task_cls: type[Task], procs: launch.Processes, steps: int,
             scratch: Path) -> Measured | None:
    """Build ``cfg``'s task and run it for ``steps`` steps, one evaluation batch and a checkpoint round trip;
    what rank 0 measured (None on other ranks)."""
    device = procs.device
    reset_peaks(device)
    task = task_cls(cfg, procs)
    describe = task.describe()
    loader = getattr(task, "train_loader", None)
    if loader is not None:
        task.train_loader = timed = TimedBatches(loader, steps, device)
        row = task.train_epoch(1)
        unit_s, wait_s, per_unit = timed.step_s, timed.wait_s, timed.images[0]
        epochs = 1
    else:
        unit_s, wait_s, per_unit = [], [], 0
        for epoch in range(1, steps + 1):
            start = time.perf_counter()
            row = task.train_epoch(epoch)
            synchronize(device)
            unit_s.append(time.perf_counter() - start)
            wait_s.append(0.0)
        epochs = steps
    unit = "step" if loader is not None else "epoch"
    if diverged_on_rank0(row, procs):  # what follows would only fail on the NaN
        if not procs.main:
            return None
        metric, value = first_nonfinite(row)
        return Measured(describe, unit, unit_s, wait_s, per_unit, 0.0, 0, None, None, None, 0, 0.0,
                        nonfinite=f"{metric} = {value}")

    val_loader = getattr(task, "val_loader", None)
    if val_loader is not None:
        task.val_loader = timed_val = TimedBatches(val_loader, 1, device)
    start = time.perf_counter()
    task.evaluate(epochs)
    synchronize(device)
    eval_s = time.perf_counter() - start
    eval_images = timed_val.images[0] if val_loader is not None else 0

    path = scratch / "checkpoint" / "last.pt"
    start = time.perf_counter()
    if procs.main:
        config = resolved_config(cfg, procs)
        checkpoint.save(checkpoint_state(epochs, config_digest(config), config, task, {}), path)
    saved = launch.broadcast_state(checkpoint.load(path) if procs.main else None, procs)
    task.load_state_dict(saved["task"])
    checkpoint_s = time.perf_counter() - start
    if not procs.main:
        return None
    cuda = device.type == "cuda"
    measured = Measured(
        describe, unit, unit_s, wait_s, per_unit, eval_s, eval_images,
        torch.cuda.max_memory_allocated(device) if cuda else None,
        torch.cuda.max_memory_reserved(device) if cuda else None,
        None if cuda else peak_rss(), path.stat().st_size, checkpoint_s)
    path.unlink()
    return measured
