"""What every task's training epoch does besides its own forward and loss, written once.

    self.net, self.adjuster = attach_method(cfg, self.model, width, procs)  # GAL + DDP wiring
    meter = EpochMeter(("train_loss", *STEP_STATS), epoch, steps_per_epoch(loader, cfg.task.max_steps),
                       cfg, procs, self.adjuster)
    for images, labels in meter.batches(loader):  # sets the sampler's epoch, seeds each step, stops at steps,
        ...                                          # shows progress (Progress); forward, backward or
        meter.add(values, len(labels))               # adjuster.backward, optimiser step; step values summed on
    row = meter.finish(lr, reduce=True)              # the device: no sync per step. finish: column means, lr,
                                                     # time_per_image, time_per_step, images_per_s, h's movement

Progress within an epoch, on rank 0 only: on a terminal a tqdm bar (steps, images/s, loss, ETA); elsewhere
(Slurm logs, CI, DVC) one line every ``task.log_every`` steps or every PROGRESS_INTERVAL_S seconds, whichever
comes later, so a log holds a line a minute at most. ``task.log_every=0``: none.

``method_state`` / ``load_method_state`` are the part of a task's ``state_dict`` every task holds.
``in_memory_epoch`` is the whole epoch of a one-process CPU task whose data are tensors in memory (regression,
digits): no loader, no progress within the epoch.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn
from tqdm import tqdm

from gal_core import count_parameters
from pipelines.training import launch
from pipelines.training.method import STEP_STATS, adjuster_movement, adjuster_snapshot, build_adjuster
from pipelines.training.seeding import sample_seed, seed_everything


def attach_method(cfg: DictConfig, model: nn.Module, width: int,
                  procs: launch.Processes) -> tuple[nn.Module, Any]:
    """The network to train (``model``, or its DDP wrapper on several processes) and the GradientAdjuster of
    cfg.method for outputs of ``width`` (None for plain training) on the model's device, DDP-wrapped with it,
    its step compiled with trainer.compile. Call it right after building the model: h's initial weights are
    drawn here."""
    adjuster = build_adjuster(cfg.method, width, process_group=procs.group)
    if adjuster is not None:
        adjuster.to(procs.device)
        if launch.compiled_step(cfg.trainer):
            adjuster.compile()
    if procs.world == 1:
        return model, adjuster
    ids = [procs.device.index] if procs.device.type == "cuda" else None
    net = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if adjuster is not None:
        adjuster.wrap_ddp(device_ids=ids)
    return net, adjuster


def in_memory_epoch(model: nn.Module, adjuster, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                    batch_size: int, shuffle: torch.Generator, loss: Callable, per_sample_loss: Callable
                    ) -> dict[str, float]:
    """One epoch over (x, y) in batches shuffled by ``shuffle``: plain backward, or GAL's step with its detailed
    statistics; ``loss(z, target)`` is the batch loss, ``per_sample_loss(z, target)`` one loss per row. Returns
    the epoch's means of the step values (summed on the device: one host copy), ``train_loss``, ``lr`` and, with
    GAL, h's movement over the epoch."""
    sums: dict[str, torch.Tensor] = {}
    batches = 0
    h_start = adjuster_snapshot(adjuster) if adjuster is not None else None
    model.train()
    for idx in torch.randperm(len(x), generator=shuffle).split(batch_size):
        xb, yb = x[idx], y[idx]
        optimizer.zero_grad(set_to_none=True)
        out = model(xb)
        loss_fn = lambda z: loss(z, yb)  # noqa: E731
        if adjuster is None:
            value = loss_fn(out)
            value.backward()
            step_stats = {"loss": value.detach()}
        else:
            stats = adjuster.backward(out, loss_fn, optimizer.param_groups[0]["lr"], detailed=True,
                                      per_sample_loss_fn=lambda z: per_sample_loss(z, yb))
            step_stats = {name: getattr(stats, name) for name in ("loss", *STEP_STATS, "adjusted_better")}
        optimizer.step()
        for name, value in step_stats.items():
            sums[name] = sums.get(name, 0) + value
        batches += 1
    means = {name: total.item() / batches for name, total in sums.items()}
    if h_start is not None:
        means.update(adjuster_movement(adjuster, h_start))
    return {"train_loss": means.pop("loss"), "lr": optimizer.param_groups[0]["lr"], **means}


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


PROGRESS_INTERVAL_S = 60.0  # off a terminal: at least this long between two progress lines
BAR_INTERVAL_S = 1.0        # on a terminal: how often the bar's loss and images/s are read again
LOSS = "train_loss"         # the column the progress shows as the loss (its epoch mean so far)
clock = time.perf_counter   # the meter's clock (tests drive it)


def duration(seconds: float) -> str:
    """H:MM:SS."""
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


class Progress:
    """What an epoch shows as it goes (rank 0): a tqdm bar on a terminal (stdout), else a line every ``every``
    steps and at least PROGRESS_INTERVAL_S apart. ``show`` after each step: its ``loss`` is a function, called
    only when something prints, because reading a value off the GPU waits for it (a host-device sync)."""

    def __init__(self, epoch: int, steps: int, every: int, start: float):
        self.epoch, self.steps, self.every = epoch, steps, every
        self.last_step, self.last_time = 0, start
        self.start = start
        self.bar = tqdm(total=steps, desc=f"epoch {epoch}", unit="step", leave=False, file=sys.stdout,
                        dynamic_ncols=True) if sys.stdout.isatty() else None

    def _due(self, step: int, now: float, every: int, interval: float) -> bool:
        return step - self.last_step >= every and now - self.last_time >= interval

    def show(self, step: int, images: int, loss: Callable[[], float | None]) -> None:
        now = clock()
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            if self._due(step, now, 1, BAR_INTERVAL_S):
                self.bar.set_postfix_str(self._rates(images, now, loss()), refresh=False)
                self.last_step, self.last_time = step, now
        elif self._due(step, now, self.every, PROGRESS_INTERVAL_S):
            eta = duration((now - self.start) / step * (self.steps - step))
            print(f"  epoch {self.epoch} step {step}/{self.steps}, {self._rates(images, now, loss())}, ETA {eta}",
                  flush=True)
            self.last_step, self.last_time = step, now

    def _rates(self, images: int, now: float, loss: float | None) -> str:
        text = f"{images / max(now - self.start, 1e-9):.1f} images/s"
        return text if loss is None else f"{text}, loss {loss:.4f}"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


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
        self.added = 0     # steps whose values ``add`` got
        self.waited = 0.0  # seconds spent waiting for the loader
        self.start = clock()

    def batches(self, loader: Iterable) -> Iterator[Any]:
        """The epoch's first ``steps`` batches; each step's RNGs seeded from (seed, epoch, step, rank), so
        dropout and the like do not depend on resuming. Shows the progress after each step (rank 0)."""
        loader.sampler.set_epoch(self.epoch)
        batches = iter(loader)
        progress = Progress(self.epoch, self.steps, self.log_every, self.start) \
            if self.procs.main and self.log_every else None
        try:
            for step in range(self.steps):
                asked = clock()
                batch = next(batches, None)
                self.waited += clock() - asked
                if batch is None:
                    return
                self.step = step
                seed_everything(sample_seed(self.seed, self.epoch, step, self.procs.rank))
                yield batch
                if progress is not None:
                    progress.show(step + 1, self.images, self.running_loss)
        finally:
            if progress is not None:
                progress.close()

    def running_loss(self) -> float | None:
        """The epoch's mean loss so far on this process (None without a loss column). ``.item()`` waits for the
        device (a host-device sync): called only on the steps that print."""
        if LOSS not in self.columns or not self.added:
            return None
        return self.sums[self.columns.index(LOSS)].item() / self.added

    def add(self, values: Sequence[torch.Tensor | float], images: int) -> None:
        """One step's values (tensors stay on the device) and this process's batch size."""
        self.sums += torch.stack([torch.as_tensor(v, device=self.sums.device).to(torch.float64) for v in values])
        self.images += images * self.procs.world
        self.added += 1

    def finish(self, lr: float, reduce: bool) -> dict[str, float]:
        """The history row's training columns. ``reduce``: the sums are this process's own (a plain loss), so
        they are averaged over processes; GAL's statistics are batch-global already."""
        if self.procs.device.type == "cuda":
            torch.cuda.synchronize(self.procs.device)
        elapsed = clock() - self.start
        sums = launch.all_reduce_sum(self.sums, self.procs) / self.procs.world if reduce else self.sums
        row = dict(zip(self.columns, (sums / max(self.steps, 1)).tolist()))
        # time_per_step leaves the loader out, as the authors' proc_time (Table VII's times are per iteration)
        row.update(lr=lr, time_per_image=elapsed / max(self.images, 1), images_per_s=self.images / elapsed,
                   time_per_step=(elapsed - self.waited) / max(self.steps, 1))
        if self.h_start is not None:
            row.update(adjuster_movement(self.adjuster, self.h_start))
        return row
