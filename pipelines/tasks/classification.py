"""Image classification (Tables I-III, VII; Figs. 5, 6, 8b): a timm model on CIFAR-10/100 or ImageNet,
trained with plain backward or with GAL, on one process or many (torchrun + DDP), resumable per epoch.

    python -m pipelines.train experiment=cifar100_sgd_gal seed=0 profile=paper [trainer.gpus=4]

One epoch: step the timm scheduler, train on every global batch (GAL: ``adjuster.backward`` in place of
``loss.backward``), update the EMA, evaluate. The runner (pipelines/tasks/runner.py) does the rest:
processes, resume, checkpoints, tracking. Time per image (Table VII) = training-loop wall time of the epoch
/ training images.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from gal_core import count_parameters
from pipelines.errors import ConfigError
from pipelines.tasks import RunError, image_data, launch, runner
from pipelines.tasks.image_data import sample_seed, seed_everything
from pipelines.tasks.method import (STEP_STATS, adjuster_movement, adjuster_snapshot, build_adjuster,
                                    build_optimizer_for)

GAL_STATS = (*STEP_STATS, "adjusted_better")


def build_model(cfg: DictConfig, classes: int) -> nn.Module:
    import timm

    m = cfg.model
    extra = {"bn_momentum": m.bn_momentum} if m.get("bn_momentum") is not None else {}  # EfficientNets take it
    try:
        return timm.create_model(m.name, pretrained=m.pretrained, num_classes=classes, drop_rate=m.drop_rate,
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


def build_scheduler(cfg: DictConfig, optimizer: torch.optim.Optimizer):
    from timm.scheduler import create_scheduler_v2

    s = cfg.task.schedule
    scheduler, _ = create_scheduler_v2(optimizer, sched=s.name, num_epochs=cfg.task.epochs,
                                       decay_epochs=s.decay_epochs, decay_milestones=list(s.decay_milestones),
                                       decay_rate=s.decay_rate, min_lr=s.min_lr, warmup_lr=s.warmup_lr,
                                       warmup_epochs=s.warmup_epochs)
    return scheduler


def model_param_groups(cfg: DictConfig, model: nn.Module) -> list[dict]:
    if cfg.task.no_weight_decay_bias_norm:  # timm's rule: 1-D parameters (biases, norms) get no decay
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
        runner.require_int(cfg, "task.workers", 0)
        if task.max_steps is not None:
            runner.require_int(cfg, "task.max_steps", 1)
        if task.batch_size % world:
            raise ConfigError(f"task.batch_size={task.batch_size} (global) must be divisible by the {world} "
                              "processes")

    def __init__(self, cfg: DictConfig, procs: launch.Processes):
        self.cfg, self.procs, self.device = cfg, procs, procs.device
        cuda = self.device.type == "cuda"
        trainer = cfg.trainer
        precision = str(trainer.precision)
        bf16 = precision == "bf16" or (precision == "auto" and cuda)
        self.autocast = dict(device_type=self.device.type, dtype=torch.bfloat16, enabled=bf16)
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
        self.adjuster = build_adjuster(cfg.method, self.classes, process_group=procs.group)
        if self.adjuster is not None:
            self.adjuster.to(self.device)
        self.net = self.model
        if procs.world > 1:
            ids = [self.device.index] if cuda else None
            self.net = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
            if self.adjuster is not None:
                self.adjuster.wrap_ddp(device_ids=ids)
        self.optimizer = build_optimizer_for(cfg.optim, model_param_groups(cfg, self.model), self.adjuster,
                                             cfg.method)
        self.scheduler = build_scheduler(cfg, self.optimizer)
        self.ema = None
        if cfg.task.ema_decay:
            from timm.utils import ModelEmaV3
            self.ema = ModelEmaV3(self.model, decay=cfg.task.ema_decay)
        self.epoch_times: list[float] = []

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
                     time_per_image=sum(self.epoch_times) / len(self.epoch_times), **self.parameter_counts())
        return final

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(),
                "adjuster": self.adjuster.state_dict() if self.adjuster is not None else {},
                "optimizer": self.optimizer.state_dict(),
                "ema": self.ema.module.state_dict() if self.ema is not None else {},
                "epoch_times": list(self.epoch_times)}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        if self.adjuster is not None:
            self.adjuster.load_state_dict(state["adjuster"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.ema is not None:
            self.ema.module.load_state_dict(state["ema"])
        self.epoch_times = list(state["epoch_times"])

    # -------------------------------------------------------------------------------- one epoch
    def train_epoch(self, epoch: int) -> dict[str, float]:
        cfg, procs = self.cfg, self.procs
        self.scheduler.step(epoch - 1)  # timm schedulers are functions of the (0-based) epoch
        self.net.train()
        self.train_loader.sampler.set_epoch(epoch)
        smoothing = cfg.task.label_smoothing
        steps = len(self.train_loader)
        if cfg.task.max_steps is not None:
            steps = min(cfg.task.max_steps, steps)
        names = ("loss", *GAL_STATS) if self.adjuster is not None else ("loss",)
        sums = torch.zeros(len(names), device=self.device, dtype=torch.float64)
        lr = self.optimizer.param_groups[0]["lr"]
        h_start = adjuster_snapshot(self.adjuster) if self.adjuster is not None else None  # h's movement
        images_seen = 0
        start = time.perf_counter()
        for step, (images, labels) in enumerate(self.train_loader):
            if step >= steps:
                break
            seed_everything(sample_seed(cfg.seed, epoch, step, procs.rank))  # dropout, erasing: resume-proof
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            x = self.preprocess(images, train=True)
            self.optimizer.zero_grad(set_to_none=True)
            with torch.autocast(**self.autocast):
                logits = self.net(x)
            loss_fn = lambda z: F.cross_entropy(z.float(), labels, label_smoothing=smoothing)  # noqa: E731
            if self.adjuster is None:
                loss = loss_fn(logits)
                loss.backward()
                values = [loss.detach()]  # this process's shard: averaged over processes once per epoch
            else:
                per_sample = lambda z: F.cross_entropy(z.float(), labels, reduction="none",  # noqa: E731
                                                       label_smoothing=smoothing)
                stats = self.adjuster.backward(logits, loss_fn, lr, per_sample_loss_fn=per_sample)
                values = [getattr(stats, name) for name in names]  # batch-global when world > 1
            self.optimizer.step()
            if self.ema is not None:
                self.ema.update(self.model)
            sums += torch.stack([v.to(torch.float64) for v in values])  # on the device: no sync per step
            images_seen += len(labels) * procs.world
            if procs.main and cfg.task.log_every and (step + 1) % cfg.task.log_every == 0:
                rate = images_seen / (time.perf_counter() - start)
                print(f"  epoch {epoch} step {step + 1}/{steps} ({rate:.1f} images/s)", flush=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - start
        if self.adjuster is None:  # GAL's stats are batch-global already; the plain loss is per process
            sums = launch.all_reduce_sum(sums, procs) / procs.world
        means = (sums / max(steps, 1)).tolist()
        row = {f"train_{n}" if n == "loss" else n: v for n, v in zip(names, means)}
        row.update(lr=lr, time_per_image=elapsed / max(images_seen, 1), images_per_s=images_seen / elapsed)
        if h_start is not None:
            row.update(adjuster_movement(self.adjuster, h_start))
        self.epoch_times.append(row["time_per_image"])
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
        adjuster = count_parameters(self.adjuster, weights_only=True) if self.adjuster is not None else 0
        return {"params_model": count_parameters(self.model), "params_adjuster": adjuster}


def run(cfg: DictConfig) -> None:
    runner.run(cfg, Classification)
