"""Regression (Table V): an MLP on a tabular set, trained with or without GAL, evaluated on a held-out split."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from gal_core import GradientAdjuster
from gal_core.optim import build_optimizer, param_groups
from pipelines.tracking import RunTracker
from pipelines.tasks import RunError


def split(rows: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train/test indices from the seed alone, so baseline and GAL of one seed see the same split."""
    order = np.random.default_rng(seed).permutation(rows)
    n_test = max(1, round(rows * test_fraction))
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def mlp(features: int, hidden: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for fan_in, fan_out in zip([features, *hidden], hidden):
        layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(hidden[-1] if hidden else features, 1))


def standardiser(values: np.ndarray, enabled: bool) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std of the training values (identity when disabled); constant columns keep std 1."""
    if not enabled:
        return np.zeros(values.shape[1:]), np.ones(values.shape[1:])
    std = values.std(axis=0)
    return values.mean(axis=0), np.where(std > 0, std, 1.0)


def regression_metrics(pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    residual = pred - target
    mse = residual.pow(2).mean().item()
    total = (target - target.mean()).pow(2).mean().item()
    return {"mae": residual.abs().mean().item(), "mse": mse, "r2": 1.0 - mse / total if total > 0 else math.nan}


def load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise RunError(f"{path} is missing: run `dvc repro` (its prepare stage makes it)")
    with np.load(path) as arrays:
        return arrays["X"].astype(np.float64), arrays["y"].astype(np.float64)


def run(cfg: DictConfig) -> None:
    torch.set_num_threads(cfg.task.threads)
    torch.use_deterministic_algorithms(True)
    root = Path(cfg.root)
    data_file = root / "data" / "processed" / f"{cfg.data.name}.npz"
    X, y = load(data_file)
    train_idx, test_idx = split(len(y), cfg.task.test_fraction, cfg.seed)
    x_mean, x_std = standardiser(X[train_idx], cfg.task.scale_features)
    y_mean, y_std = standardiser(y[train_idx, None], cfg.task.scale_target)
    as_tensor = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    x_train, x_test = as_tensor((X[train_idx] - x_mean) / x_std), as_tensor((X[test_idx] - x_mean) / x_std)
    y_train = as_tensor((y[train_idx, None] - y_mean) / y_std)
    y_test = as_tensor(y[test_idx, None])

    torch.manual_seed(cfg.seed)
    model = mlp(X.shape[1], list(cfg.data.model.hidden))
    method = cfg.method
    adjuster = GradientAdjuster(1, tuple(cfg.data.adjuster.arch), ratio=method.ratio, scale=method.scale,
                                policy=method.policy, remainder=method.remainder) if method.gal else None
    groups = param_groups(model, adjuster) if adjuster is not None else model.parameters()
    optimizer = build_optimizer(cfg.optim.name, groups, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    shuffle = torch.Generator().manual_seed(cfg.seed)
    batch_size = cfg.data.train.batch_size

    def evaluate() -> dict[str, float]:
        model.eval()
        with torch.no_grad():
            pred = model(x_test) * float(y_std[0]) + float(y_mean[0])
        model.train()
        return regression_metrics(pred, y_test)

    config = OmegaConf.to_container(cfg, resolve=True)
    run_name = f"{cfg.data.name}-{method.name}-s{cfg.seed}"
    with RunTracker("regression", run_name, config, profile=cfg.profile, data_files=[data_file],
                    runs_root=root / "runs") as tracker:
        for epoch in range(1, cfg.task.epochs + 1):
            sums: dict[str, torch.Tensor] = {}
            batches = 0
            for idx in torch.randperm(len(x_train), generator=shuffle).split(batch_size):
                xb, yb = x_train[idx], y_train[idx]
                optimizer.zero_grad(set_to_none=True)
                out = model(xb)
                loss_fn = lambda z: F.mse_loss(z, yb)  # noqa: E731
                if adjuster is None:
                    loss = loss_fn(out)
                    loss.backward()
                    step_stats = {"loss": loss.detach()}
                else:
                    stats = adjuster.backward(out, loss_fn, optimizer.param_groups[0]["lr"],
                                              per_sample_loss_fn=lambda z: (z - yb).pow(2).mean(-1))
                    step_stats = {name: getattr(stats, name) for name in
                                  ("loss", "remainder", "accepted", "cosine", "adjusted_better")}
                optimizer.step()
                for name, value in step_stats.items():  # summed on the device; one host copy per epoch
                    sums[name] = sums.get(name, 0) + value
                batches += 1
            epoch_means = {name: total.item() / batches for name, total in sums.items()}
            test = evaluate()
            row = {"train_loss": epoch_means.pop("loss"), **{f"test_{k}": v for k, v in test.items()},
                   "lr": optimizer.param_groups[0]["lr"], **epoch_means}
            tracker.log_epoch(epoch, row)  # refuses NaN/inf: a diverged run fails loudly
        tracker.log_final({f"test_{k}": v for k, v in evaluate().items()})
