"""What every task's training epoch does besides its own forward and loss, written once.

    self.net, self.adjuster = attach_method(cfg.method, self.model, width, procs)  # GAL + DDP wiring
    meter = EpochMeter(("train_loss", *STEP_STATS), epoch, steps_per_epoch(loader, cfg.task.max_steps),
                       cfg, procs, self.adjuster)
    for images, labels in meter.batches(loader):  # sets the sampler's epoch, seeds each step, stops at steps
        ...                                          # forward, backward or adjuster.backward, optimiser step
        meter.add(values, len(labels))               # step values summed on the device: no sync per step
    row = meter.finish(lr, reduce=True)  # column means, lr, time_per_image, time_per_step, images_per_s, h's movement

``method_state`` / ``load_method_state`` are the part of a task's ``state_dict`` every task holds.
"""
from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence, Sized
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from gal_core import count_parameters
from pipelines.training import launch
from pipelines.training.method import adjuster_movement, adjuster_snapshot, build_adjuster
from pipelines.training.seeding import sample_seed, seed_everything


def attach_method(method: DictConfig, model: nn.Module, width: int,
                  procs: launch.Processes) -> tuple[nn.Module, Any]:
    """The network to train (``model``, or its DDP wrapper on several processes) and the GradientAdjuster of
    ``method`` for outputs of ``width`` (None for plain training) on the model's device, DDP-wrapped with it.
    Call it right after building the model: h's initial weights are drawn here."""
    adjuster = build_adjuster(method, width, process_group=procs.group)
    if adjuster is not None:
        adjuster.to(procs.device)
    if procs.world == 1:
        return model, adjuster
    ids = [procs.device.index] if procs.device.type == "cuda" else None
    net = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if adjuster is not None:
        adjuster.wrap_ddp(device_ids=ids)
    return net, adjuster


def adjuster_weights(adjuster) -> int:
    """The adjuster's weight count (params_adjuster; 0 for plain training)."""
    return count_parameters(adjuster, weights_only=True) if adjuster is not None else 0


def method_state(model: nn.Module, adjuster, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The part of a checkpoint every task holds: model, adjuster (empty without one) and optimiser."""
    return {"model": model.state_dict(), "adjuster": adjuster.state_dict() if adjuster is not None else {},
            "optimizer": optimizer.state_dict()}


def load_method_state(state: dict[str, Any], model: nn.Module, adjuster, optimizer: torch.optim.Optimizer) -> None:
    model.load_state_dict(state["model"])
    if adjuster is not None:
        adjuster.load_state_dict(state["adjuster"])
    optimizer.load_state_dict(state["optimizer"])


def steps_per_epoch(loader: Sized, max_steps: int | None) -> int:
    """The loader's batches, capped at ``task.max_steps`` (null: no cap)."""
    return len(loader) if max_steps is None else min(max_steps, len(loader))


class EpochMeter:
    """One training epoch's step count, per-step seeding, column sums, images/s, progress lines and h's
    movement. ``columns`` name the values ``add`` gets, in the history row's order."""

    def __init__(self, columns: Sequence[str], epoch: int, steps: int, cfg: DictConfig,
                 procs: launch.Processes, adjuster=None):
        self.columns, self.epoch, self.steps, self.procs = tuple(columns), epoch, steps, procs
        self.seed, self.log_every = cfg.seed, cfg.task.log_every
        self.sums = torch.zeros(len(self.columns), device=procs.device, dtype=torch.float64)
        self.adjuster = adjuster
        self.h_start = adjuster_snapshot(adjuster) if adjuster is not None else None
        self.images = 0
        self.waited = 0.0  # seconds spent waiting for the loader
        self.start = time.perf_counter()

    def batches(self, loader: Iterable) -> Iterator[Any]:
        """The epoch's first ``steps`` batches; each step's RNGs seeded from (seed, epoch, step, rank), so
        dropout and the like do not depend on resuming."""
        loader.sampler.set_epoch(self.epoch)
        batches = iter(loader)
        for step in range(self.steps):
            asked = time.perf_counter()
            batch = next(batches, None)
            self.waited += time.perf_counter() - asked
            if batch is None:
                return
            self.step = step
            seed_everything(sample_seed(self.seed, self.epoch, step, self.procs.rank))
            yield batch

    def add(self, values: Sequence[torch.Tensor | float], images: int) -> None:
        """One step's values (tensors stay on the device) and this process's batch size."""
        self.sums += torch.stack([torch.as_tensor(v, device=self.sums.device).to(torch.float64) for v in values])
        self.images += images * self.procs.world
        if self.procs.main and self.log_every and (self.step + 1) % self.log_every == 0:
            rate = self.images / (time.perf_counter() - self.start)
            print(f"  epoch {self.epoch} step {self.step + 1}/{self.steps} ({rate:.1f} images/s)", flush=True)

    def finish(self, lr: float, reduce: bool) -> dict[str, float]:
        """The history row's training columns. ``reduce``: the sums are this process's own (a plain loss), so
        they are averaged over processes; GAL's statistics are batch-global already."""
        if self.procs.device.type == "cuda":
            torch.cuda.synchronize(self.procs.device)
        elapsed = time.perf_counter() - self.start
        sums = launch.all_reduce_sum(self.sums, self.procs) / self.procs.world if reduce else self.sums
        row = dict(zip(self.columns, (sums / max(self.steps, 1)).tolist()))
        # time_per_step leaves the loader out, as the authors' proc_time (Table VII's times are per iteration)
        row.update(lr=lr, time_per_image=elapsed / max(self.images, 1), images_per_s=self.images / elapsed,
                   time_per_step=(elapsed - self.waited) / max(self.steps, 1))
        if self.h_start is not None:
            row.update(adjuster_movement(self.adjuster, self.h_start))
        return row
