"""Image classification (Tables I-III, VII; Figs. 5, 6, 8b): a timm model on CIFAR-10/100 or ImageNet,
trained with plain backward or with GAL, on one process or many (torchrun + DDP), resumable per epoch.

    python -m pipelines.train experiment=cifar100_sgd_gal seed=0 profile=paper [trainer.gpus=4]

One epoch: step the timm scheduler, train on every global batch (GAL: ``adjuster.backward`` in place of
``loss.backward``), update the EMA, evaluate. The runner (pipelines/training/runner.py) does the rest:
processes, resume, checkpoints, tracking; pipelines/training/epoch.py the epoch's bookkeeping. Time per image (Table VII) = training-loop wall time of the epoch
/ training images.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from gal_core import count_parameters
from pipelines.config import require_number
from pipelines.errors import ConfigError, RunError
from pipelines.tasks.classification import data as image_data
from pipelines.training import launch, runner
from pipelines.training.epoch import (EpochMeter, adjuster_weights, attach_method, load_method_state, method_state,
                                      steps_per_epoch)
from pipelines.training.method import STEP_STATS, build_optimizer_for
from pipelines.training.seeding import seed_everything

GAL_STATS = (*STEP_STATS, "adjusted_better")
# Numbers the task reads, with the values that mean something (config.require_number); OPTIONAL ones may be null
RANGES = {"task.label_smoothing": "[0, 1)", "task.augment.hflip": "[0, 1]", "task.augment.reprob": "[0, 1]",
          "task.schedule.decay_rate": "(0, inf)", "task.schedule.decay_epochs": "(0, inf)",
          "task.schedule.warmup_lr": "[0, inf)", "task.schedule.min_lr": "[0, inf)",
          "model.drop_rate": "[0, 1)", "model.drop_path_rate": "[0, 1)"}
OPTIONAL = {"task.ema_decay": "[0, 1)", "task.eval_crop_pct": "(0, 1]", "model.bn_momentum": "[0, 1]"}


def build_model(cfg: DictConfig, classes: int) -> nn.Module:
    import timm

    m = cfg.model
    extra = {"bn_momentum": m.bn_momentum} if m.get("bn_momentum") is not None else {}  # EfficientNets take it
    try:
        model = timm.create_model(m.name, pretrained=m.pretrained, num_classes=classes, drop_rate=m.drop_rate,
                                  drop_path_rate=m.drop_path_rate, **extra)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise RunError(f"model.name={m.name!r} is not a timm model (timm.list_models() lists them)") from None
        raise
    except TypeError as err:
        if extra and "bn_momentum" in str(err):
            raise RunError(f"model.name={m.name!r} takes no bn_momentum: set model.bn_momentum=null") from None
        raise
    except Exception as err:  # no hub access, missing cache: the message names the fix
        if not m.pretrained:
            raise
        raise RunError(f"cannot load pretrained weights for {m.name} ({type(err).__name__}); without access "
                       "to the Hugging Face hub set model.pretrained=false (random init), or fill HF_HOME's "
                       "cache on a machine that has it") from None
    if m.get("drop_path_uniform"):
        uniform_drop_path(model, m.drop_path_rate)
    return model


def uniform_drop_path(model: nn.Module, rate: float) -> None:
    """Every residual block of a timm ResNet drops its branch at ``rate``, as the authors' timm 0.1.18 did
    (current timm raises the rate with depth, from 0 at the first block)."""
    from timm.layers import DropPath
    from timm.models.resnet import BasicBlock, Bottleneck

    blocks = [b for b in model.modules() if isinstance(b, (BasicBlock, Bottleneck))]
    if not blocks:
        raise ConfigError(f"model.drop_path_uniform=true: {type(model).__name__} has no ResNet blocks; it applies "
                          "to timm ResNets only")
    for block in blocks:
        block.drop_path = DropPath(rate) if rate else None


def build_scheduler(cfg: DictConfig, optimizer: torch.optim.Optimizer):
    from timm.scheduler import create_scheduler_v2

    s = cfg.task.schedule
    scheduler, _ = create_scheduler_v2(optimizer, sched=s.name, num_epochs=cfg.task.epochs,
                                       decay_epochs=s.decay_epochs, decay_milestones=list(s.decay_milestones),
                                       decay_rate=s.decay_rate, min_lr=s.min_lr, warmup_lr=s.warmup_lr,
                                       warmup_epochs=s.warmup_epochs)
    return scheduler


def model_param_groups(cfg: DictConfig, model: nn.Module) -> list[dict]:
    if cfg.task.no_weight_decay_bias_norm:  # timm's rule: 1-D parameters (biases, norms) get no decay (h's too)
        from timm.optim import param_groups_weight_decay
        return param_groups_weight_decay(model, cfg.optim.get("weight_decay", 0.0))
    return [{"params": list(model.parameters())}]


class Classification(runner.Task):
    """Everything one classification run holds (the runner drives it)."""

    name = "classification"

    @classmethod
    def check(cls, cfg: DictConfig, world: int) -> None:
        task = cfg.task
        for key in ("batch_size", "eval_batch_size", "image_size"):
            runner.require_int(cfg, f"task.{key}", 1)
        for key in ("task.workers", "task.log_every", "task.schedule.warmup_epochs"):
            runner.require_int(cfg, key, 0)
        if task.max_steps is not None:
            runner.require_int(cfg, "task.max_steps", 1)
        for i in range(len(task.schedule.decay_milestones)):
            runner.require_int(cfg, f"task.schedule.decay_milestones.{i}", 1)
        for key, interval in RANGES.items():
            require_number(cfg, key, interval)
        for key, interval in OPTIONAL.items():
            require_number(cfg, key, interval, optional=True)
        if task.batch_size % world:
            raise ConfigError(f"task.batch_size={task.batch_size} (global) must be divisible by the {world} "
                              "processes")

    def __init__(self, cfg: DictConfig, procs: launch.Processes):
        self.cfg, self.procs, self.device = cfg, procs, procs.device
        cuda = self.device.type == "cuda"
        trainer = cfg.trainer
        precision = launch.precision(trainer, self.device.type)
        self.autocast = dict(device_type=self.device.type, enabled=precision != "fp32",
                             dtype=torch.float16 if precision == "fp16" else torch.bfloat16)
        # fp16 scales the loss (every GAL backward root too) so small gradients survive; skips inf/nan steps
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=precision == "fp16")
        channels_last = cuda if trainer.channels_last == "auto" else bool(trainer.channels_last)

        self.root = Path(cfg.root)
        train_set, val_set, self.classes, self.data_files = image_data.datasets(cfg, self.root)
        self.train_loader, self.val_loader = image_data.loaders(train_set, val_set, cfg, procs.rank,
                                                                procs.world, pin=cuda)
        self.preprocess = image_data.DevicePreprocess(cfg, self.device, channels_last)

        seed_everything(cfg.seed)  # the same initial weights on every rank
        self.model = build_model(cfg, self.classes).to(self.device)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.net, self.adjuster = attach_method(cfg, self.model, self.classes, procs)
        self.optimizer = build_optimizer_for(cfg.optim, model_param_groups(cfg, self.model), self.adjuster,
                                             cfg.method, no_decay_1d=cfg.task.no_weight_decay_bias_norm)
        self.scheduler = build_scheduler(cfg, self.optimizer)
        self.ema = None
        if cfg.task.ema_decay:
            from timm.utils import ModelEmaV3
            self.ema = ModelEmaV3(self.model, decay=cfg.task.ema_decay)
        self.epoch_times: list[float] = []  # each epoch's time_per_image
        self.step_times: list[float] = []   # each epoch's time_per_step (loader wait left out)

    # -------------------------------------------------------------------------------- the runner's hooks
    def describe(self) -> str:
        counts = self.parameter_counts()
        return (f"{counts['params_model']:,} model parameters, {counts['params_adjuster']:,} adjuster weights; "
                f"{len(self.train_loader)} steps per epoch")

    def progress(self, row: dict[str, float]) -> str:
        return (f"train_loss {row['train_loss']:.4f} val_loss {row['val_loss']:.4f} top-1 err "
                f"{row['val_top1_err']:.2f}% ({row['images_per_s']:.1f} images/s)")

    def final_metrics(self, last_row: dict[str, float]) -> dict[str, float]:
        final = {k: v for k, v in last_row.items() if k.startswith(("val_", "raw_val_"))}
        final.update(val_top1_acc=100 - final["val_top1_err"], val_top5_acc=100 - final["val_top5_err"],
                     time_per_image=sum(self.epoch_times) / len(self.epoch_times),
                     time_per_step=sum(self.step_times) / len(self.step_times), **self.parameter_counts())
        return final

    def state_dict(self) -> dict:
        return {**method_state(self.model, self.adjuster, self.optimizer), "scaler": self.scaler.state_dict(),
                "ema": self.ema.module.state_dict() if self.ema is not None else {},
                "epoch_times": list(self.epoch_times),
                "step_times": list(self.step_times)}

    def load_state_dict(self, state: dict) -> None:
        if "step_times" not in state or "scaler" not in state:
            raise RunError(f"the run's checkpoint (checkpoints/{self.name}/) predates time_per_step and the loss "
                           "scaler: delete it to start the run over")
        load_method_state(state, self.model, self.adjuster, self.optimizer)
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            self.ema.module.load_state_dict(state["ema"])
        self.epoch_times, self.step_times = list(state["epoch_times"]), list(state["step_times"])

    # -------------------------------------------------------------------------------- one epoch
    def train_epoch(self, epoch: int) -> dict[str, float]:
        cfg = self.cfg
        self.scheduler.step(epoch - 1)  # timm schedulers are functions of the (0-based) epoch
        self.net.train()
        smoothing = cfg.task.label_smoothing
        columns = ("train_loss", *GAL_STATS) if self.adjuster is not None else ("train_loss",)
        lr = self.optimizer.param_groups[0]["lr"]
        meter = EpochMeter(columns, epoch, steps_per_epoch(self.train_loader, cfg.task.max_steps), cfg, self.procs,
                           self.adjuster)
        for images, labels in meter.batches(self.train_loader):  # each step seeded: dropout, erasing
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            x = self.preprocess(images, train=True)
            self.optimizer.zero_grad(set_to_none=True)
            with torch.autocast(**self.autocast):
                logits = self.net(x)
            loss_fn = lambda z: F.cross_entropy(z.float(), labels, label_smoothing=smoothing)  # noqa: E731
            if self.adjuster is None:
                loss = loss_fn(logits)
                self.scaler.scale(loss).backward()
                values = [loss.detach()]  # this process's shard: averaged over processes once per epoch
            else:
                per_sample = lambda z: F.cross_entropy(z.float(), labels, reduction="none",  # noqa: E731
                                                       label_smoothing=smoothing)
                stats = self.adjuster.backward(logits, loss_fn, lr, per_sample_loss_fn=per_sample, detailed=True,
                                               scaler=self.scaler if self.scaler.is_enabled() else None)
                values = [stats.loss, *(getattr(stats, name) for name in GAL_STATS)]  # batch-global
            self.scaler.step(self.optimizer)  # optimizer.step() unless fp16 (then unscaled, inf steps skipped)
            self.scaler.update()
            if self.ema is not None:
                self.ema.update(self.model)
            meter.add(values, len(labels))
        row = meter.finish(lr, reduce=self.adjuster is None)
        self.epoch_times.append(row["time_per_image"])
        self.step_times.append(row["time_per_step"])
        return row

    @torch.no_grad()
    def evaluate_model(self, model: nn.Module) -> dict[str, float]:
        model.eval()
        k = min(5, self.classes)
        sums = torch.zeros(4, device=self.device, dtype=torch.float64)  # loss, top-1 and top-k hits, images
        for images, labels in self.val_loader:
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            with torch.autocast(**self.autocast):
                logits = model(self.preprocess(images, train=False))
            logits = logits.float()
            topk = logits.topk(k, dim=1).indices == labels[:, None]
            sums += torch.stack([F.cross_entropy(logits, labels, reduction="sum").double(),
                                 topk[:, 0].sum().double(), topk.any(dim=1).sum().double(),
                                 torch.tensor(len(labels), device=self.device, dtype=torch.float64)])
        loss, top1, top5, n = launch.all_reduce_sum(sums, self.procs).tolist()
        return {"val_loss": loss / n, "val_top1_err": 100 * (1 - top1 / n), "val_top5_err": 100 * (1 - top5 / n)}

    def evaluate(self, epoch: int) -> dict[str, float]:
        """val_* of the model timm would report: the EMA model when EMA is on (raw model as raw_val_*)."""
        raw = self.evaluate_model(self.model)
        if self.ema is None:
            return raw
        return {**self.evaluate_model(self.ema.module), **{f"raw_{k}": v for k, v in raw.items()}}

    def parameter_counts(self) -> dict[str, int]:
        return {"params_model": count_parameters(self.model), "params_adjuster": adjuster_weights(self.adjuster)}


def run(cfg: DictConfig) -> None:
    runner.run(cfg, Classification)
