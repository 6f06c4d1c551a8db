"""COCO 2017 for the detection task: datasets with DETR's augmentation (torchvision's CocoDetection and box-aware
v2 transforms), padded batches with masks, and COCO evaluation with pycocotools gathered over ranks.

Labels are COCO's own category ids (1..90, non-contiguous): the model has num_classes + 1 = 92 logits and no
id is remapped, so detections go to COCOeval as they are. Training targets leave out crowd boxes (iscrowd=1,
as DETR does); evaluation reads the annotation file itself, crowd boxes included (COCOeval ignores matches
to them).
"""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from pipelines.errors import RunError
from pipelines.training.launch import worker_init
from pipelines.training.seeding import EpochSampler, SeededDataset

AP_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")  # COCOeval.stats[0:6], reported in percent


class RandomSizeCrop(v2.Transform):
    """DETR's RandomSizeCrop: a crop of random height and width in [min_size, max_size] (at most the image)."""

    def __init__(self, min_size: int, max_size: int):
        super().__init__()
        self.min_size, self.max_size = min_size, max_size

    def make_params(self, flat_inputs):
        height, width = v2.query_size(flat_inputs)
        h = int(torch.randint(min(self.min_size, height), min(height, self.max_size) + 1, ()))
        w = int(torch.randint(min(self.min_size, width), min(width, self.max_size) + 1, ()))
        top = int(torch.randint(0, height - h + 1, ()))
        left = int(torch.randint(0, width - w + 1, ()))
        return dict(top=top, left=left, height=h, width=w)

    def transform(self, inpt, params):
        return self._call_kernel(TF.crop, inpt, **params)


def transforms(aug, train: bool) -> v2.Transform:
    """DETR's: random flip, then either a multi-scale resize or resize + random crop + multi-scale resize
    (train; ``crop_size`` None leaves the crop branch out); one scale (val). Images stay uint8: the device
    normalises. Boxes a crop leaves empty go."""
    scales, max_size = list(aug.scales), aug.max_size
    if train:
        resize = v2.RandomShortestSize(scales, max_size=max_size)
        if aug.crop_size is not None:
            resize = v2.RandomChoice([resize, v2.Compose([v2.RandomShortestSize(list(aug.crop_resize)),
                                                          RandomSizeCrop(*aug.crop_size), resize])])
        steps = [v2.RandomHorizontalFlip(0.5), resize]
    else:
        steps = [v2.Resize(aug.eval_size, max_size=max_size)]
    return v2.Compose([*steps, v2.SanitizeBoundingBoxes()])


class CocoDetection(Dataset):
    """(uint8 CHW image, target) with target = {"image_id", "labels" (category ids), "boxes" (normalised
    cxcywh), "orig_size" (h, w), "size" (h, w after the transform)}; crowd boxes left out. Category ids are
    checked once to be class indices below ``classes``."""

    def __init__(self, images: Path, annotations: Path, transform: v2.Transform, classes: int):
        from torchvision.datasets import CocoDetection as TorchvisionCoco, wrap_dataset_for_transforms_v2

        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints while it indexes
            base = TorchvisionCoco(str(images), str(annotations))
        bad = sorted({a["category_id"] for a in base.coco.dataset.get("annotations", ())
                      if not 0 <= a["category_id"] < classes})
        if bad:
            raise RunError(f"{annotations} holds category_id {bad[0]}, outside 0..{classes - 1} (data.num_classes="
                           f"{classes}); rerun its prepare stage (dvc repro prepare_coco)")
        self.ids = list(base.ids)
        self.base = wrap_dataset_for_transforms_v2(base, target_keys=("boxes", "labels", "iscrowd"))
        self.transform = transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        image, target = self.base[index]
        image = TF.pil_to_tensor(image.convert("RGB"))  # grayscale JPEGs too
        size = tuple(image.shape[-2:])
        boxes = target.get("boxes")
        if boxes is None:  # an image without objects
            boxes = tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=size)
        labels = target.get("labels", torch.zeros(0, dtype=torch.int64))
        keep = ~torch.as_tensor(target.get("iscrowd", [0] * len(labels)), dtype=torch.bool)
        image, out = self.transform(image, {"boxes": tv_tensors.wrap(boxes[keep], like=boxes), "labels": labels[keep]})
        h, w = image.shape[-2:]
        boxes = TF.convert_bounding_box_format(out["boxes"], new_format="CXCYWH").as_subclass(torch.Tensor)
        boxes = boxes.float() / torch.tensor([w, h, w, h], dtype=torch.float32)
        return image.as_subclass(torch.Tensor), {
            "image_id": int(self.ids[index]), "labels": out["labels"].long(), "boxes": boxes,
            "orig_size": torch.tensor(size), "size": torch.tensor([h, w])}


def collate(batch):
    """Images padded to the batch's largest height and width (bottom-right), a mask that is True on padding
    (DETR's NestedTensor), and the targets as a list."""
    images, targets = zip(*batch)
    height = max(i.shape[1] for i in images)
    width = max(i.shape[2] for i in images)
    padded = torch.zeros(len(images), 3, height, width, dtype=images[0].dtype)
    mask = torch.ones(len(images), height, width, dtype=torch.bool)
    for k, image in enumerate(images):
        padded[k, :, :image.shape[1], :image.shape[2]] = image
        mask[k, :image.shape[1], :image.shape[2]] = False
    return padded, mask, list(targets)


def datasets(cfg, root: Path) -> tuple[Dataset, Dataset, Path, list[Path]]:
    """(train, val, the val annotation file, the data paths to checksum) of data/processed/coco/."""
    processed = root / "data" / "processed"
    folder, sidecar = processed / "coco", processed / "coco.json"
    if not sidecar.is_file():
        raise RunError(f"{sidecar} is missing: run the prepare stage of coco first (dvc repro prepare_coco)")
    annotations = {split: folder / "annotations" / f"instances_{split}2017.json" for split in ("train", "val")}
    try:
        classes = cfg.data.num_classes
        train = CocoDetection(folder / "train2017", annotations["train"], transforms(cfg.task.augment, True), classes)
        val = CocoDetection(folder / "val2017", annotations["val"], transforms(cfg.task.augment, False), classes)
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as err:
        raise RunError(f"cannot read the prepared COCO files in {folder} ({type(err).__name__}: {err}); rerun "
                       "its prepare stage (dvc repro prepare_coco)") from None
    return SeededDataset(train, cfg.seed), val, annotations["val"], [folder, sidecar]


def loaders(train: Dataset, val: Dataset, cfg, rank: int, world: int, pin: bool) -> tuple[DataLoader, DataLoader]:
    """Per-process loaders over the global batch (as image_data.loaders). The validation sampler pads the
    last shard with repeats; evaluate() drops them by image id."""
    batch, workers = cfg.task.batch_size, cfg.task.workers
    if len(train) < batch:
        raise RunError(f"task.batch_size={batch} is larger than the {len(train)} training images")
    extra = dict(num_workers=workers, pin_memory=pin, persistent_workers=workers > 0, worker_init_fn=worker_init,
                 collate_fn=collate, prefetch_factor=2 if workers > 0 else None)
    sampler = EpochSampler(train, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed, drop_last=True)
    train_loader = DataLoader(train, batch_size=batch // world, sampler=sampler, drop_last=True, **extra)
    val_sampler = DistributedSampler(val, num_replicas=world, rank=rank, shuffle=False)
    val_loader = DataLoader(val, batch_size=cfg.task.eval_batch_size, sampler=val_sampler, **extra)
    return train_loader, val_loader


def gather_by_image(per_image: dict[int, Any], world: int) -> dict[int, Any] | None:
    """Every rank's {image id: result} merged on rank 0 (None on the others). The sampler's padding repeats a
    few images on a second rank: merging by image id keeps each image once."""
    if world == 1:
        return per_image
    gathered = [None] * world
    dist.all_gather_object(gathered, per_image)
    return {image: result for part in gathered for image, result in part.items()} if dist.get_rank() == 0 else None


def coco_ap(annotations: Path, detections: list[dict]) -> dict[str, float]:
    """COCO box AP (val_AP, val_AP50, ... in percent) of detections in COCO's result format."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(annotations))
        if not detections:
            return {f"val_{name}": 0.0 for name in AP_NAMES}
        dt = gt.loadRes(detections)
        evaluator = COCOeval(gt, dt, iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {f"val_{name}": 100 * max(float(v), 0.0) for name, v in zip(AP_NAMES, evaluator.stats[:6])}
