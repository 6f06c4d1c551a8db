"""Progress within a training epoch (pipelines/training/epoch.py), driven by a fake clock: off a terminal one
line every task.log_every steps or every PROGRESS_INTERVAL_S seconds, whichever comes later; the loss read only
on the steps that print; nothing from a rank other than 0; on a terminal a tqdm bar instead of lines."""
from __future__ import annotations

import sys

import pytest
import torch
from omegaconf import OmegaConf

from pipelines.training import epoch, launch


class FakeClock:
    """Time that moves only when a test says so."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Loader(list):
    class sampler:  # noqa: N801 (what a DataLoader's sampler offers the meter)
        @staticmethod
        def set_epoch(epoch: int) -> None:
            pass


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(epoch, "clock", fake)
    return fake


def train(clock: FakeClock, steps: int, log_every: int, seconds_per_step: float, rank: int = 0) -> None:
    """One epoch of ``steps`` steps of 4 images each, step k's loss k (the running mean after k steps: (k+1)/2)."""
    cfg = OmegaConf.create({"seed": 0, "task": {"log_every": log_every}})
    procs = launch.Processes(rank=rank, local_rank=rank, world=1, device=torch.device("cpu"))
    meter = epoch.EpochMeter(("train_loss", "remainder"), 1, steps, cfg, procs)
    for k, _ in enumerate(meter.batches(Loader(range(steps))), start=1):
        clock.now += seconds_per_step
        meter.add([torch.tensor(float(k)), torch.tensor(0.5)], 4)


@pytest.mark.parametrize("log_every, seconds_per_step, printed", [
    (1, 25.0, [3, 6, 9]),   # every step asked, a minute apart at least: the clock decides
    (4, 25.0, [4, 8]),      # every 4 steps, 100 s apart: the steps decide
    (1, 1.0, []),           # an epoch shorter than a minute: no line
    (50, 100.0, []),        # fewer steps than log_every: no line
])
def test_off_a_terminal_a_line_every_n_steps_or_a_minute_whichever_comes_later(clock, capsys, log_every,
                                                                                seconds_per_step, printed):
    train(clock, 10, log_every, seconds_per_step)
    lines = capsys.readouterr().out.splitlines()
    assert [int(line.split()[3].split("/")[0]) for line in lines] == printed, lines


def test_a_line_says_step_images_per_second_loss_and_eta(clock, capsys, monkeypatch):
    monkeypatch.setattr(epoch, "PROGRESS_INTERVAL_S", 0.0)  # every log_every steps
    train(clock, 10, 3, 2.0)
    assert capsys.readouterr().out.splitlines() == [
        "  epoch 1 step 3/10, 2.0 images/s, loss 2.0000, ETA 0:00:14",
        "  epoch 1 step 6/10, 2.0 images/s, loss 3.5000, ETA 0:00:08",
        "  epoch 1 step 9/10, 2.0 images/s, loss 5.0000, ETA 0:00:02",
    ]


def test_the_loss_is_read_only_on_the_steps_that_print(clock, capsys):
    reads = []
    progress = epoch.Progress(1, 100, 10, start=0.0)
    for step in range(1, 101):
        clock.now += 7.0
        progress.show(step, 4 * step, lambda: reads.append(step) or 1.0)  # reading a GPU value syncs
    progress.close()
    assert reads == [10, 20, 30, 40, 50, 60, 70, 80, 90, 100]  # 70 s per 10 steps: the steps decide
    assert len(capsys.readouterr().out.splitlines()) == len(reads)


def test_other_ranks_print_nothing(clock, capsys, monkeypatch):
    monkeypatch.setattr(epoch, "PROGRESS_INTERVAL_S", 0.0)
    train(clock, 10, 1, 100.0, rank=1)
    assert capsys.readouterr().out == ""


def test_log_every_zero_prints_nothing(clock, capsys, monkeypatch):
    monkeypatch.setattr(epoch, "PROGRESS_INTERVAL_S", 0.0)
    train(clock, 10, 0, 100.0)
    assert capsys.readouterr().out == ""


def test_on_a_terminal_a_bar_shows_steps_images_per_second_and_loss(clock, capsys, monkeypatch):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    progress = epoch.Progress(2, 10, 3, start=0.0)
    for step in range(1, 5):
        clock.now += 0.5
        progress.show(step, 8 * step, lambda: 1.25)
    bar = progress.bar
    assert bar is not None and (bar.n, bar.total, bar.desc) == (4, 10, "epoch 2")
    assert bar.postfix == "16.0 images/s, loss 1.2500"  # read again each BAR_INTERVAL_S: at steps 2 and 4
    progress.close()
    assert "  epoch 2 step" not in capsys.readouterr().out  # the bar, not lines
