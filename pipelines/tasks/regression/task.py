"""Regression (Table V): an MLP on a tabular set (data.py), trained with or without GAL, evaluated on a held-out
split, on the shared runner (pipelines/training/runner.py): resumable per epoch like every task."""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, ListConfig
from torch import nn

from gal_core import count_parameters
from pipelines.errors import ConfigError
from pipelines.tasks.regression.data import load, split, standardiser, test_rows
from pipelines.training import runner
from pipelines.training.epoch import attach_method, in_memory_epoch, load_method_state, method_state
from pipelines.training.method import build_optimizer_for


# The least rows a split may leave: an MLP fit on fewer training rows than features + 1 is underdetermined even
# where it is linear (its test metrics mean nothing), and R^2 needs two test rows (one has no variance)
MIN_TEST_ROWS = 2


def data_file(cfg: DictConfig) -> Path:
    return Path(cfg.root) / "data" / "processed" / f"{cfg.data.name}.npz"


def mlp(features: int, hidden: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for fan_in, fan_out in zip([features, *hidden], hidden):
        layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(hidden[-1] if hidden else features, 1))


def regression_metrics(pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    residual = pred - target
    mse = residual.pow(2).mean().item()
    total = (target - target.mean()).pow(2).mean().item()
    return {"mae": residual.abs().mean().item(), "mse": mse, "r2": 1.0 - mse / total if total > 0 else math.nan}


class Regression(runner.Task):
    """One MLP on one table: built in __init__, trained and evaluated by the runner epoch by epoch."""

    name = "regression"

    @classmethod
    def check(cls, cfg: DictConfig, world: int) -> None:
        if world > 1:
            raise ConfigError("task=regression runs on one process: use trainer.gpus=1 trainer.nodes=1")
        if str(cfg.trainer.precision) not in ("auto", "fp32"):
            raise ConfigError(f"trainer.precision={cfg.trainer.precision}: task=regression trains in fp32 (auto)")
        runner.require_int(cfg, "data.train.batch_size", 1)
        hidden = cfg.data.model.hidden
        if not isinstance(hidden, ListConfig) or not all(isinstance(w, int) and not isinstance(w, bool) and w >= 1
                                                         for w in hidden):
            raise ConfigError(f"data.model.hidden={hidden}: use a list of positive integers (the MLP's hidden "
                              "widths; [] for a linear model)")
        fraction = cfg.task.test_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
            raise ConfigError(f"task.test_fraction={cfg.task.test_fraction}: use a fraction between 0 and 1")
        if data_file(cfg).is_file():  # a missing file is __init__'s to report (a job may find it elsewhere)
            X, _ = load(data_file(cfg))
            rows, n_test = len(X), test_rows(len(X), fraction)
            if rows - n_test < X.shape[1] + 1 or n_test < MIN_TEST_ROWS:
                raise ConfigError(f"task.test_fraction={fraction} leaves {rows - n_test} training and {n_test} test "
                                  f"rows of the {rows} in {data_file(cfg)}: training needs at least "
                                  f"{X.shape[1] + 1} (features + 1), testing {MIN_TEST_ROWS}")

    def __init__(self, cfg: DictConfig, procs):
        self.cfg, self.device = cfg, procs.device
        self.data_files = [data_file(cfg)]
        X, y = load(self.data_files[0])
        train_idx, test_idx = split(len(y), cfg.task.test_fraction, cfg.seed)
        x_mean, x_std = standardiser(X[train_idx], cfg.task.scale_features)
        y_mean, y_std = standardiser(y[train_idx, None], cfg.task.scale_target)
        as_tensor = lambda a: torch.tensor(a, dtype=torch.float32, device=self.device)  # noqa: E731
        self.x_train, self.x_test = (as_tensor((X[idx] - x_mean) / x_std) for idx in (train_idx, test_idx))
        self.y_train = as_tensor((y[train_idx, None] - y_mean) / y_std)
        self.y_test = as_tensor(y[test_idx, None])
        self.y_mean, self.y_std = float(y_mean[0]), float(y_std[0])

        torch.manual_seed(cfg.seed)
        self.model = mlp(X.shape[1], list(cfg.data.model.hidden)).to(self.device)
        _, self.adjuster = attach_method(cfg, self.model, 1, procs)  # one process: no DDP
        self.optimizer = build_optimizer_for(cfg.optim, [{"params": list(self.model.parameters())}],
                                             self.adjuster, cfg.method)
        self.shuffle = torch.Generator().manual_seed(cfg.seed)

    def describe(self) -> str:
        return (f"{len(self.x_train)} training and {len(self.x_test)} test rows, "
                f"{count_parameters(self.model):,} model parameters")

    def train_epoch(self, epoch: int) -> dict[str, float]:
        return in_memory_epoch(self.model, self.adjuster, self.optimizer, self.x_train, self.y_train,
                               self.cfg.data.train.batch_size, self.shuffle, F.mse_loss,
                               lambda z, target: (z - target).pow(2).mean(-1))

    @torch.no_grad()
    def evaluate(self, epoch: int) -> dict[str, float]:
        self.model.eval()
        pred = self.model(self.x_test) * self.y_std + self.y_mean
        return {f"test_{k}": v for k, v in regression_metrics(pred, self.y_test).items()}

    def final_metrics(self, last_row: dict[str, float]) -> dict[str, float]:
        return {k: v for k, v in last_row.items() if k.startswith("test_")}

    def progress(self, row: dict[str, float]) -> str:
        return f"train_loss {row['train_loss']:.4f} test_mae {row['test_mae']:.4f}"

    def state_dict(self) -> dict:
        return {**method_state(self.model, self.adjuster, self.optimizer), "shuffle": self.shuffle.get_state()}

    def load_state_dict(self, state: dict) -> None:
        load_method_state(state, self.model, self.adjuster, self.optimizer)
        self.shuffle.set_state(state["shuffle"].cpu())


def run(cfg: DictConfig) -> None:
    runner.run(cfg, Regression)
