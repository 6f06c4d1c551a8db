"""Image classification (Tables I-III, VII; Figs. 5, 6, 8b): a timm model on CIFAR-10/100 or ImageNet,
trained with plain backward or with GAL, on one process or many (torchrun + DDP), resumable per epoch.

    python -m pipelines.train experiment=cifar100_sgd_gal seed=0 profile=paper [trainer.gpus=4]

One epoch: train on every global batch (GAL: ``adjuster.backward`` in place of ``loss.backward``), step
the timm scheduler, update the EMA, evaluate, log one history row on rank 0, checkpoint atomically.
A rerun of the same config after a crash or kill continues from the last checkpoint and ends with the
same metrics as an uninterrupted run (bitwise on CPU with task.deterministic=true; timings aside), in the
same MLflow run. Time per image (Table VII) = training-loop wall time of the epoch / training images.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from gal_core import GradientAdjuster, count_parameters
from gal_core.optim import build_optimizer
from pipelines.tasks import RunError, checkpoint, image_data, launch
from pipelines.tasks.image_data import sample_seed, seed_everything
from pipelines.tracking import RunTracker

TASK = "classification"
GAL_STATS = ("remainder", "cosine", "accepted", "adjusted_better")


def run_name(cfg: DictConfig) -> str:
    setting = cfg.get("experiment") or f"{cfg.data.name}_{cfg.optim.name}"
    return f"{setting}-{cfg.method.name}-s{cfg.seed}"


def build_model(cfg: DictConfig, classes: int) -> nn.Module:
    import timm

    m = cfg.model
    try:
        return timm.create_model(m.name, pretrained=m.pretrained, num_classes=classes, drop_rate=m.drop_rate,
                                 drop_path_rate=m.drop_path_rate)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise RunError(f"model.name={m.name!r} is not a timm model (timm.list_models() lists them)") from None
        raise
    except Exception as err:  # no hub access, missing cache: the message names the fix
        if not m.pretrained:
            raise
        raise RunError(f"cannot load pretrained weights for {m.name} ({type(err).__name__}); without access "
                       "to the Hugging Face hub set model.pretrained=false (random init), or fill HF_HOME's "
                       "cache on a machine that has it") from None


def build_adjuster(cfg: DictConfig, classes: int, procs: launch.Processes) -> GradientAdjuster | None:
    method = cfg.method
    if not method.gal:
        return None
    return GradientAdjuster(classes, tuple(cfg.data.adjuster.arch), ratio=method.ratio, scale=method.scale,
                            policy=method.policy, remainder=method.remainder, kind=method.kind,
                            process_group=procs.group)


def build_optimizer_for(cfg: DictConfig, model: nn.Module, adjuster: nn.Module | None) -> torch.optim.Optimizer:
    kwargs = {k: (tuple(v) if isinstance(v, list) else v)
              for k, v in OmegaConf.to_container(cfg.optim).items() if k != "name"}
    if cfg.task.no_weight_decay_bias_norm:  # timm's rule: 1-D parameters (biases, norms) get no decay
        from timm.optim import param_groups_weight_decay
        groups = param_groups_weight_decay(model, kwargs.get("weight_decay", 0.0))
    else:
        groups = [{"params": list(model.parameters())}]
    if adjuster is not None and cfg.method.gal:
        lr = cfg.method.adjuster_lr
        groups.append({"params": list(adjuster.parameters()), **({"lr": lr} if lr is not None else {})})
    try:
        return build_optimizer(cfg.optim.name, groups, **kwargs)
    except (TypeError, ValueError) as err:
        raise RunError(f"optim={cfg.optim.name}: {err}") from None


def build_scheduler(cfg: DictConfig, optimizer: torch.optim.Optimizer):
    from timm.scheduler import create_scheduler_v2

    s = cfg.task.schedule
    scheduler, _ = create_scheduler_v2(optimizer, sched=s.name, num_epochs=cfg.task.epochs,
                                       decay_epochs=s.decay_epochs, decay_milestones=list(s.decay_milestones),
                                       decay_rate=s.decay_rate, min_lr=s.min_lr, warmup_lr=s.warmup_lr,
                                       warmup_epochs=s.warmup_epochs)
    return scheduler


def config_digest(config: dict) -> str:
    """What a checkpoint must match to be resumed: the config without ``trainer`` (where and on how many
    processes the run goes, which differs between nodes and does not change the results)."""
    rest = {k: v for k, v in config.items() if k != "trainer"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True, default=str).encode()).hexdigest()


class Trainer:
    """Everything one run holds; ``fit`` runs the epochs left and logs them through ``tracker``."""

    def __init__(self, cfg: DictConfig, procs: launch.Processes):
        self.cfg, self.procs, self.device = cfg, procs, procs.device
        cuda = self.device.type == "cuda"
        trainer = cfg.trainer
        precision = str(trainer.precision)
        if precision not in ("auto", "bf16", "fp32"):
            raise RunError(f"trainer.precision={precision!r}: use auto, bf16 or fp32")
        bf16 = precision == "bf16" or (precision == "auto" and cuda)
        self.autocast = dict(device_type=self.device.type, dtype=torch.bfloat16, enabled=bf16)
        channels_last = cuda if trainer.channels_last == "auto" else bool(trainer.channels_last)

        self.root = Path(cfg.root)
        train_set, val_set, self.classes, self.data_paths = image_data.datasets(cfg, self.root)
        self.train_loader, self.val_loader = image_data.loaders(train_set, val_set, cfg, procs.rank,
                                                                procs.world, pin=cuda)
        self.preprocess = image_data.DevicePreprocess(cfg, self.device, channels_last)

        seed_everything(cfg.seed)  # the same initial weights on every rank
        self.model = build_model(cfg, self.classes).to(self.device)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.adjuster = build_adjuster(cfg, self.classes, procs)
        if self.adjuster is not None:
            self.adjuster.to(self.device)
        self.net = self.model
        if procs.world > 1:
            ids = [self.device.index] if cuda else None
            self.net = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
            if self.adjuster is not None:
                self.adjuster.wrap_ddp(device_ids=ids)
        self.optimizer = build_optimizer_for(cfg, self.model, self.adjuster)
        self.scheduler = build_scheduler(cfg, self.optimizer)
        self.ema = None
        if cfg.task.ema_decay:
            from timm.utils import ModelEmaV3
            self.ema = ModelEmaV3(self.model, decay=cfg.task.ema_decay)
        self.epoch_times: list[float] = []

    # -------------------------------------------------------------------------------- checkpoints
    def state(self, epoch: int, config_sha: str, tracker_state: dict | None) -> dict:
        return {"epoch": epoch, "config_sha": config_sha, "model": self.model.state_dict(),
                "adjuster": self.adjuster.state_dict() if self.adjuster is not None else {},
                "optimizer": self.optimizer.state_dict(),
                "ema": self.ema.module.state_dict() if self.ema is not None else {},
                "epoch_times": list(self.epoch_times), "tracker": tracker_state}

    def restore(self, state: dict) -> None:
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
        self.net.train()
        self.train_loader.sampler.set_epoch(epoch)
        smoothing = cfg.task.label_smoothing
        steps = len(self.train_loader)
        if cfg.task.max_steps is not None:
            steps = min(cfg.task.max_steps, steps)
        names = ("loss", *GAL_STATS) if self.adjuster is not None else ("loss",)
        sums = torch.zeros(len(names), device=self.device, dtype=torch.float64)
        lr = self.optimizer.param_groups[0]["lr"]
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
        return row

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
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

    def validate(self) -> dict[str, float]:
        """val_* of the model timm would report: the EMA model when EMA is on (raw model as raw_val_*)."""
        raw = self.evaluate(self.model)
        if self.ema is None:
            return raw
        return {**self.evaluate(self.ema.module), **{f"raw_{k}": v for k, v in raw.items()}}

    def parameter_counts(self) -> dict[str, int]:
        adjuster = count_parameters(self.adjuster, weights_only=True) if self.adjuster is not None else 0
        return {"params_model": count_parameters(self.model), "params_adjuster": adjuster}


def fit(cfg: DictConfig, procs: launch.Processes) -> None:
    root = Path(cfg.root)
    trainer = Trainer(cfg, procs)
    name = run_name(cfg)
    config = OmegaConf.to_container(cfg, resolve=True)
    config_sha = config_digest(config)
    ckpt_path = root / "checkpoints" / TASK / name / "last.pt"
    # rank 0 decides and sends the checkpoint: only node 0 has it, and other nodes' configs may differ (root)
    saved = checkpoint.load(ckpt_path) if procs.main else None
    resumable = saved is not None and saved["config_sha"] == config_sha and saved["epoch"] < cfg.task.epochs
    if saved is not None and not resumable:
        why = "a finished run" if saved["config_sha"] == config_sha else "another config"
        print(f"starting {name} over: {ckpt_path} holds {why}", flush=True)
    saved = launch.from_main(saved if resumable else None, procs)
    start, resume = 1, None
    if saved is not None:
        trainer.restore(saved)
        start, resume = saved["epoch"] + 1, saved["tracker"]
        if procs.main:
            print(f"resuming {name} after epoch {saved['epoch']} from {ckpt_path}", flush=True)
    counts = trainer.parameter_counts()
    if procs.main:
        print(f"{name}: {counts['params_model']:,} model parameters, {counts['params_adjuster']:,} adjuster "
              f"weights; {len(trainer.train_loader)} steps per epoch on {procs.world} process(es), "
              f"{procs.device}", flush=True)
    tracker = (RunTracker(TASK, name, config, profile=cfg.profile, data_files=trainer.data_paths,
                          runs_root=root / "runs", resume=resume) if procs.main else contextlib.nullcontext())
    with tracker:
        for epoch in range(start, cfg.task.epochs + 1):
            trainer.scheduler.step(epoch - 1)  # timm schedulers are functions of the (0-based) epoch
            row = trainer.train_epoch(epoch)
            row.update(trainer.validate())
            trainer.epoch_times.append(row["time_per_image"])
            if procs.main:
                tracker.log_epoch(epoch, row)  # refuses NaN/inf: a diverged run fails loudly
                checkpoint.save(trainer.state(epoch, config_sha, tracker.state()), ckpt_path)
                print(f"epoch {epoch}/{cfg.task.epochs} train_loss {row['train_loss']:.4f} val_loss "
                      f"{row['val_loss']:.4f} top-1 err {row['val_top1_err']:.2f}% "
                      f"({row['images_per_s']:.1f} images/s)", flush=True)
        if procs.main:
            final = {k: v for k, v in row.items() if k.startswith(("val_", "raw_val_"))}
            final.update(val_top1_acc=100 - final["val_top1_err"], val_top5_acc=100 - final["val_top5_err"],
                         time_per_image=sum(trainer.epoch_times) / len(trainer.epoch_times), **counts)
            tracker.log_final(final)


def run(cfg: DictConfig) -> None:
    trainer = cfg.trainer
    if trainer.gpus * trainer.nodes > 1 and not launch.under_torchrun():
        sys.exit(launch.relaunch(trainer))
    if cfg.task.threads:
        torch.set_num_threads(cfg.task.threads)
    if cfg.task.epochs < 1:
        raise RunError(f"task.epochs={cfg.task.epochs}: train for at least one epoch")
    if cfg.task.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # what deterministic cuBLAS needs
        torch.use_deterministic_algorithms(True)
    else:
        torch.backends.cudnn.benchmark = True
    procs = launch.setup(trainer)
    try:
        fit(cfg, procs)
    finally:
        launch.teardown()
