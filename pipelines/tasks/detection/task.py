"""Object detection (Table IV): DETR on COCO 2017, trained with plain backward or with GAL on the boxes, on the
shared runner (processes, resume, checkpoints and tracking are pipelines/training/runner.py's).

    python -m pipelines.train experiment=coco_detr_r50_gal seed=0 profile=paper trainer.gpus=4

Where GAL acts (the paper: "the predicted bounding box features, i.e. four floats indicating a box"): the
criterion matches predictions to targets once per decoder layer in the forward pass. GAL's output is the final
layer's *matched* boxes (N x 4, normalised cxcywh after the sigmoid) and its loss DETR's box loss on them with
that matching held fixed, so a trial step never re-matches. Everything GAL does not adjust (the final layer's
class loss over all queries, the auxiliary decoder losses) is ``extra_loss``, back-propagated in the same
single backward call. Unmatched queries have no box loss, hence a zero box gradient: adjusting all B x Q x 4
rows would send the model the same gradient, but GAL's statistics (remainder, cosine) would then average over
rows that carry nothing; on the matched rows they describe the boxes that are learned. Then DETR's gradient
clipping on the model and the optimiser step.
"""
from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from pipelines.config import require_number
from pipelines.errors import ConfigError, RunError
from pipelines.tasks.detection import data as coco_data
from pipelines.tasks.detection.detr.detr import PostProcess, SetCriterion, build_detr
from pipelines.training import launch, runner
from pipelines.training.epoch import (EpochMeter, adjuster_weights, attach_method, load_method_state, method_state,
                                      steps_per_epoch)
from pipelines.training.method import STEP_STATS, build_optimizer_for
from pipelines.training.seeding import seed_everything

GAL_STATS = STEP_STATS
# Numbers the task reads, with the values that mean something (config.require_number)
RANGES = {"task.lr_backbone": "[0, inf)", "task.clip_max_norm": "[0, inf)", "task.matcher.cost_class": "[0, inf)",
          "task.matcher.cost_bbox": "[0, inf)", "task.matcher.cost_giou": "[0, inf)", "task.loss.bbox": "[0, inf)",
          "task.loss.giou": "[0, inf)", "task.loss.eos_coef": "[0, inf)", "model.dropout": "[0, 1)"}
MODEL_SIZES = {"hidden_dim": 2, "nheads": 1, "enc_layers": 0, "dec_layers": 1, "dim_feedforward": 1, "num_queries": 1}
LOSS_TERMS = ("loss_ce", "loss_bbox", "loss_giou")


def model_param_groups(model: nn.Module, lr_backbone: float) -> list[dict]:
    """DETR's two groups: the transformer and heads at the optimiser's lr, the backbone at ``lr_backbone``."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for n, p in trainable if "backbone" not in n]},
            {"params": [p for n, p in trainable if "backbone" in n], "lr": lr_backbone}]


class Detection(runner.Task):
    """Everything one DETR run holds (the runner drives it)."""

    name = "detection"

    @classmethod
    def check(cls, cfg: DictConfig, world: int) -> None:
        for key in ("batch_size", "eval_batch_size", "lr_drop"):
            runner.require_int(cfg, f"task.{key}", 1)
        runner.require_int(cfg, "task.workers", 0)
        runner.require_int(cfg, "task.log_every", 0)
        if cfg.task.max_steps is not None:
            runner.require_int(cfg, "task.max_steps", 1)
        for key, interval in RANGES.items():
            require_number(cfg, key, interval)
        for key, least in MODEL_SIZES.items():
            runner.require_int(cfg, f"model.{key}", least)
        width, heads = cfg.model.hidden_dim, cfg.model.nheads
        if width % 2 or width % heads:  # the sine embedding's two halves, the attention heads
            raise ConfigError(f"model.hidden_dim={width}: use an even number divisible by model.nheads={heads}")
        if cfg.task.batch_size % world:
            raise ConfigError(f"task.batch_size={cfg.task.batch_size} (global) must be divisible by the {world} "
                              "processes")
        aug = cfg.task.augment
        sizes = [*aug.scales, *aug.crop_resize, aug.eval_size]
        if not aug.scales or not all(isinstance(v, int) and v > 0 for v in [*sizes, aug.max_size]):
            raise ConfigError("task.augment: scales, crop_resize, eval_size and max_size must be positive integers")
        if aug.max_size <= max(sizes):
            raise ConfigError(f"task.augment.max_size={aug.max_size} must exceed every shorter-side size "
                              f"(largest: {max(sizes)})")
        if aug.crop_size is not None and not (len(aug.crop_size) == 2 and 0 < aug.crop_size[0] <= aug.crop_size[1]):
            raise ConfigError(f"task.augment.crop_size={list(aug.crop_size)} must be [min, max] with 0 < min <= max "
                              "(or null: no random crop)")
        if str(cfg.trainer.precision) != "fp32" or cfg.trainer.channels_last is not False:
            raise ConfigError("task=detection trains in fp32 with the default memory layout (as DETR's own code): "
                              "use trainer.precision=fp32 trainer.channels_last=false")

    def __init__(self, cfg: DictConfig, procs: launch.Processes):
        self.cfg, self.procs, self.device = cfg, procs, procs.device
        root = Path(cfg.root)
        train_set, val_set, self.val_annotations, self.data_files = coco_data.datasets(cfg, root)
        self.train_loader, self.val_loader = coco_data.loaders(train_set, val_set, cfg, procs.rank, procs.world,
                                                               pin=self.device.type == "cuda")
        norm = cfg.data.normalize
        self.mean = torch.tensor(norm.mean, device=self.device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(norm.std, device=self.device).view(1, 3, 1, 1) * 255

        seed_everything(cfg.seed)  # the same initial weights on every rank
        model_cfg = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items()
                     if k not in ("name", "smoke_backbone")}
        self.model = build_detr(num_classes=cfg.data.num_classes, **model_cfg).to(self.device)
        self.net, self.adjuster = attach_method(cfg, self.model, 4, procs)  # GAL on the boxes
        self.optimizer = build_optimizer_for(cfg.optim, model_param_groups(self.model, cfg.task.lr_backbone),
                                             self.adjuster, cfg.method)
        for group in self.optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        t = cfg.task
        self.criterion = SetCriterion(cfg.data.num_classes, cost_class=t.matcher.cost_class,
                                      cost_bbox=t.matcher.cost_bbox, cost_giou=t.matcher.cost_giou,
                                      weight_bbox=t.loss.bbox, weight_giou=t.loss.giou,
                                      eos_coef=t.loss.eos_coef).to(self.device)
        self.postprocess = PostProcess()
        self.epoch_times: list[float] = []  # each epoch's time_per_image
        self.step_times: list[float] = []   # each epoch's time_per_step (loader wait left out)

    # -------------------------------------------------------------------------------- the runner's hooks
    def describe(self) -> str:
        counts = self.parameter_counts()
        return (f"{counts['params_model']:,} trainable model parameters, {counts['params_adjuster']:,} adjuster "
                f"weights; {len(self.train_loader)} steps per epoch")

    def parameter_counts(self) -> dict[str, int]:
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        return {"params_model": trainable, "params_adjuster": adjuster_weights(self.adjuster)}

    def progress(self, row: dict[str, float]) -> str:
        return (f"train_loss {row['train_loss']:.4f} val_loss {row['val_loss']:.4f} AP {row['val_AP']:.2f} "
                f"AP50 {row['val_AP50']:.2f} ({row['images_per_s']:.1f} images/s)")

    def final_metrics(self, last_row: dict[str, float]) -> dict[str, float]:
        final = {k: v for k, v in last_row.items() if k.startswith("val_")}
        final.update(time_per_image=sum(self.epoch_times) / len(self.epoch_times),
                     time_per_step=sum(self.step_times) / len(self.step_times), **self.parameter_counts())
        return final

    def state_dict(self) -> dict:
        return {**method_state(self.model, self.adjuster, self.optimizer), "epoch_times": list(self.epoch_times),
                "step_times": list(self.step_times)}

    def load_state_dict(self, state: dict) -> None:
        if "step_times" not in state:
            raise RunError(f"the run's checkpoint (checkpoints/{self.name}/) predates time_per_step: delete it to "
                           "start the run over")
        load_method_state(state, self.model, self.adjuster, self.optimizer)
        self.epoch_times, self.step_times = list(state["epoch_times"]), list(state["step_times"])

    # -------------------------------------------------------------------------------- one epoch
    def _batch(self, images, masks, targets):
        masks = masks.to(self.device, non_blocking=True)
        images = (images.to(self.device, non_blocking=True).float() - self.mean) / self.std
        images = images.masked_fill(masks[:, None], 0.0)  # padding is zero after normalising, as in DETR
        targets = [{k: v.to(self.device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
        return images, masks, targets

    def train_epoch(self, epoch: int) -> dict[str, float]:
        cfg = self.cfg
        for group in self.optimizer.param_groups:  # DETR's StepLR: x0.1 for every group after lr_drop epochs
            group["lr"] = group["initial_lr"] * (0.1 if epoch > cfg.task.lr_drop else 1.0)
        lr = self.optimizer.param_groups[0]["lr"]
        self.net.train()
        self.criterion.train()
        columns = ("train_loss", *(f"train_{t}" for t in LOSS_TERMS), *(GAL_STATS if self.adjuster is not None else ()))
        meter = EpochMeter(columns, epoch, steps_per_epoch(self.train_loader, cfg.task.max_steps), cfg, self.procs,
                           self.adjuster)
        for batch in meter.batches(self.train_loader):  # each step seeded: dropout
            images, masks, targets = self._batch(*batch)
            self.optimizer.zero_grad(set_to_none=True)
            parts = self.criterion(self.net(images, masks), targets)
            if self.adjuster is None:
                (parts.box_loss_fn(parts.boxes) + parts.extra_loss).backward()
                gal = []
            else:
                stats = self.adjuster.backward(parts.boxes, parts.box_loss_fn, lr, extra_loss=parts.extra_loss,
                                               detailed=True)
                gal = [getattr(stats, name) for name in GAL_STATS]
            if cfg.task.clip_max_norm:
                nn.utils.clip_grad_norm_(self.model.parameters(), cfg.task.clip_max_norm)
            self.optimizer.step()
            meter.add([parts.terms["loss"], *(parts.terms[k] for k in LOSS_TERMS), *gal], len(targets))
        row = meter.finish(lr, reduce=True)  # per-process means, then over processes
        self.epoch_times.append(row["time_per_image"])
        self.step_times.append(row["time_per_step"])
        return row

    @torch.no_grad()
    def predictions(self, loader) -> dict[int, dict]:
        """{image id: {"detections": COCO-format detections, "loss": DETR's loss of that image on its own}} of
        this process's share of ``loader``. A per-image loss does not depend on batch size or process count."""
        self.model.eval()
        self.criterion.eval()
        found: dict[int, dict] = {}
        for batch in loader:
            images, masks, targets = self._batch(*batch)
            outputs = self.model(images, masks)
            sizes = torch.stack([t["orig_size"] for t in targets])
            for k, (target, result) in enumerate(zip(targets, self.postprocess(outputs, sizes))):
                loss = self.criterion(image_outputs(outputs, k), [target], over_ranks=False).terms["loss"]
                xywh = result["boxes"].clone()
                xywh[:, 2:] -= xywh[:, :2]
                found[target["image_id"]] = {"loss": float(loss), "detections": [
                    {"image_id": target["image_id"], "category_id": int(label), "bbox": [float(v) for v in box],
                     "score": float(score)}
                    for score, label, box in zip(result["scores"].tolist(), result["labels"].tolist(),
                                                 xywh.tolist())]}
        return found

    def evaluate(self, epoch: int) -> dict[str, float]:
        """val_loss (DETR's loss per image, averaged) and COCO box AP on val2017; rank 0 holds the numbers."""
        per_image = coco_data.gather_by_image(self.predictions(self.val_loader), self.procs.world)
        if per_image is None:
            return {}
        losses = [p["loss"] for p in per_image.values()]
        return {"val_loss": sum(losses) / max(len(losses), 1),
                **coco_data.coco_ap(self.val_annotations, [d for p in per_image.values() for d in p["detections"]])}


def image_outputs(outputs: dict, k: int) -> dict:
    """DETR's outputs (final and auxiliary layers) of the k-th image of a batch, as a batch of one."""
    one = {name: outputs[name][k:k + 1] for name in ("pred_logits", "pred_boxes")}
    if "aux_outputs" in outputs:
        one["aux_outputs"] = [{name: v[k:k + 1] for name, v in layer.items()} for layer in outputs["aux_outputs"]]
    return one


def run(cfg: DictConfig) -> None:
    runner.run(cfg, Detection)
