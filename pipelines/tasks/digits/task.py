"""Digits (ours, not the paper's): a small MLP or CNN classifies scikit-learn's 8x8 handwritten digits, trained
with or without GAL on the shared runner, evaluated on the prepared split's test images. GAL's output width is
the class count, 10, so the published h does get gradients here (unlike Table V's width 1)."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, ListConfig
from torch import nn

from gal_core import count_parameters
from pipelines.errors import ConfigError
from pipelines.tasks.digits.data import load
from pipelines.training import runner
from pipelines.training.epoch import attach_method, in_memory_epoch, load_method_state, method_state
from pipelines.training.method import build_optimizer_for

SIDE = 8  # the images are 8 x 8, one channel
MODELS = ("digits_mlp", "digits_cnn")


def data_file(cfg: DictConfig) -> Path:
    return Path(cfg.root) / "data" / "processed" / "digits.npz"


def build_model(model: DictConfig, classes: int) -> nn.Sequential:
    """digits_mlp: Linear+ReLU per hidden width, then a linear output. digits_cnn: 3x3 convolutions (padding 1)
    with ReLU per channel width, a 2x2 max-pool after the first, then a linear output."""
    widths = list(model.widths)
    if model.name == "digits_mlp":
        layers: list[nn.Module] = [nn.Flatten()]
        for fan_in, fan_out in zip([SIDE * SIDE, *widths], widths):
            layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
        return nn.Sequential(*layers, nn.Linear(widths[-1] if widths else SIDE * SIDE, classes))
    layers = [nn.Unflatten(1, (1, SIDE, SIDE))]
    for i, (fan_in, fan_out) in enumerate(zip([1, *widths], widths)):
        layers += [nn.Conv2d(fan_in, fan_out, 3, padding=1), nn.ReLU()] + ([nn.MaxPool2d(2)] if i == 0 else [])
    side = SIDE // 2 if widths else SIDE
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear((widths[-1] if widths else 1) * side * side, classes))


def per_sample_loss(z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(z, labels, reduction="none")


class Digits(runner.Task):
    """One model on the digits split: built in __init__, trained and evaluated by the runner epoch by epoch."""

    name = "digits"

    @classmethod
    def check(cls, cfg: DictConfig, world: int) -> None:
        if world > 1:
            raise ConfigError("task=digits runs on one process: use trainer.gpus=1 trainer.nodes=1")
        if str(cfg.trainer.precision) not in ("auto", "fp32"):
            raise ConfigError(f"trainer.precision={cfg.trainer.precision}: task=digits trains in fp32 (auto)")
        runner.require_int(cfg, "data.train.batch_size", 1)
        runner.require_int(cfg, "data.classes", 2)
        if cfg.model.name not in MODELS:
            raise ConfigError(f"model={cfg.model.name}: task=digits trains {' or '.join(MODELS)}")
        widths = cfg.model.widths
        if not isinstance(widths, ListConfig) or not all(isinstance(w, int) and not isinstance(w, bool) and w >= 1
                                                         for w in widths):
            raise ConfigError(f"model.widths={widths}: use a list of positive integers (hidden widths or channels)")

    def __init__(self, cfg: DictConfig, procs):
        self.cfg, self.device = cfg, procs.device
        self.data_files = [data_file(cfg)]
        self.x_train, self.y_train, self.x_test, self.y_test = load(self.data_files[0], self.device)
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg.model, cfg.data.classes).to(self.device)
        _, self.adjuster = attach_method(cfg, self.model, cfg.data.classes, procs)  # one process: no DDP
        self.optimizer = build_optimizer_for(cfg.optim, [{"params": list(self.model.parameters())}],
                                             self.adjuster, cfg.method)
        self.shuffle = torch.Generator().manual_seed(cfg.seed)

    def describe(self) -> str:
        return (f"{len(self.x_train)} training and {len(self.x_test)} test images, "
                f"{count_parameters(self.model):,} model parameters ({self.cfg.model.name})")

    def train_epoch(self, epoch: int) -> dict[str, float]:
        return in_memory_epoch(self.model, self.adjuster, self.optimizer, self.x_train, self.y_train,
                               self.cfg.data.train.batch_size, self.shuffle, F.cross_entropy, per_sample_loss)

    @torch.no_grad()
    def evaluate(self, epoch: int) -> dict[str, float]:
        self.model.eval()
        logits = self.model(self.x_test)
        wrong = (logits.argmax(dim=1) != self.y_test).double().mean()
        loss, error = torch.stack([F.cross_entropy(logits, self.y_test).double(), 100 * wrong]).tolist()
        return {"test_loss": loss, "test_error": error}

    def final_metrics(self, last_row: dict[str, float]) -> dict[str, float]:
        return {k: v for k, v in last_row.items() if k.startswith("test_")}

    def progress(self, row: dict[str, float]) -> str:
        return f"train_loss {row['train_loss']:.4f} test_error {row['test_error']:.2f}%"

    def state_dict(self) -> dict:
        return {**method_state(self.model, self.adjuster, self.optimizer), "shuffle": self.shuffle.get_state()}

    def load_state_dict(self, state: dict) -> None:
        load_method_state(state, self.model, self.adjuster, self.optimizer)
        self.shuffle.set_state(state["shuffle"].cpu())


def run(cfg: DictConfig) -> None:
    runner.run(cfg, Digits)
