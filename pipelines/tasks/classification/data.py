"""Image data for the classification task: datasets and loaders, and the on-device preprocessing.

Loaders yield uint8 CHW batches; the device does the float work (resize, normalise, random erasing), as
timm's prefetching loader does, so CPU workers only decode and augment. Determinism does not depend on the
number of processes, workers or on resuming (pipelines/training/seeding.py).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from pipelines.errors import RunError
from pipelines.training.launch import worker_init
from pipelines.training.seeding import EpochSampler, SeededDataset


class CifarArrays(Dataset):
    """data/processed/<cifar10|cifar100>/{split}_{images,labels}.npy (memory-mapped): uint8 CHW tensors, and
    labels checked once to be class indices below ``classes``."""

    def __init__(self, folder: Path, split: str, classes: int, hflip: float = 0.0):
        try:
            self.images = np.load(folder / f"{split}_images.npy", mmap_mode="r")
            self.labels = np.load(folder / f"{split}_labels.npy")
        except (OSError, ValueError) as err:
            raise RunError(f"cannot read the prepared CIFAR files in {folder} ({err}); rerun its prepare "
                           "stage (dvc repro)") from None
        if self.images.ndim != 4 or self.images.shape[3] != 3 or len(self.images) != len(self.labels):
            raise RunError(f"{folder}/{split}_images.npy has shape {self.images.shape} for "
                           f"{len(self.labels)} labels; rerun its prepare stage (dvc repro)")
        labels = folder / f"{split}_labels.npy"
        if not np.issubdtype(self.labels.dtype, np.integer):
            raise RunError(f"{labels} holds {self.labels.dtype} labels, not class indices; rerun its prepare stage "
                           "(dvc repro)")
        bad = self.labels[(self.labels < 0) | (self.labels >= classes)]
        if len(bad):
            raise RunError(f"{labels} holds label {bad[0]}, outside 0..{classes - 1} ({classes} classes in "
                           f"{folder.name}.json); rerun its prepare stage (dvc repro)")
        self.hflip = hflip

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image = torch.from_numpy(np.array(self.images[index])).permute(2, 0, 1)
        if self.hflip and torch.rand(()) < self.hflip:
            image = image.flip(-1)
        return image, int(self.labels[index])


def _image_folder(folder: Path, transform, class_map: dict | None = None):
    from timm.data import ImageDataset

    if not folder.is_dir():
        raise RunError(f"{folder} is missing; run the ImageNet prepare stage (dvc repro)")
    return ImageDataset(str(folder), transform=transform, **({"class_map": class_map} if class_map else {}))


def imagenet_transforms(cfg, train: bool):
    """timm's transform (RandomResizedCrop, flip, RandAugment...) ending in a uint8 tensor: normalising and
    random erasing happen on the device (use_prefetcher=True, as timm's train.py does on GPU)."""
    from timm.data import create_transform

    aug = cfg.task.augment
    kwargs = dict(input_size=cfg.task.image_size, is_training=train, use_prefetcher=True,
                  interpolation=aug.interpolation if train else "bicubic")
    if train:
        kwargs.update(hflip=aug.hflip, auto_augment=aug.auto_augment, re_prob=0.0)
        if aug.scale is not None:
            kwargs["scale"] = tuple(aug.scale)
    elif cfg.task.eval_crop_pct is not None:
        kwargs["crop_pct"] = cfg.task.eval_crop_pct
    return create_transform(**kwargs)


def datasets(cfg, root: Path) -> tuple[Dataset, Dataset, int, list[Path]]:
    """(train, val, number of classes, the data paths to checksum) of the prepared dataset cfg.data.name."""
    name = cfg.data.name
    processed = root / "data" / "processed"
    sidecar = processed / f"{name}.json"
    if not sidecar.is_file():
        raise RunError(f"{sidecar} is missing: run the prepare stage of {name} first (dvc repro)")
    classes = int(json.loads(sidecar.read_text())["classes"])
    if name.startswith("cifar"):
        folder = processed / name
        train = CifarArrays(folder, "train", classes, cfg.task.augment.hflip)
        val = CifarArrays(folder, "test", classes)
    elif name == "imagenet":
        folder = processed / "imagenet"
        train = _image_folder(folder / "train", imagenet_transforms(cfg, True))
        found = train.reader.class_to_idx  # labels are the indices of the class folders that hold images
        if len(found) > classes:
            raise RunError(f"{folder}/train holds images of {len(found)} classes, more than the {classes} of "
                           f"{sidecar.name}; rerun its prepare stage (dvc repro)")
        val = _image_folder(folder / "val", imagenet_transforms(cfg, False), class_map=found)  # the same indices
    else:
        raise RunError(f"no image dataset named {name!r}; use data=cifar10, cifar100 or imagenet")
    return SeededDataset(train, cfg.seed), val, classes, [folder, sidecar]


def loaders(train: Dataset, val: Dataset, cfg, rank: int, world: int, pin: bool) -> tuple[DataLoader, DataLoader]:
    """Per-process loaders: each takes batch_size / world of every global training batch and a 1/world
    shard of the validation set (no padding, so every image is evaluated once)."""
    batch, workers = cfg.task.batch_size, cfg.task.workers
    if len(train) < batch:
        raise RunError(f"task.batch_size={batch} is larger than the {len(train)} training images")
    extra = dict(num_workers=workers, pin_memory=pin, persistent_workers=workers > 0, worker_init_fn=worker_init,
                 prefetch_factor=4 if workers > 0 else None)
    sampler = EpochSampler(train, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed, drop_last=True)
    train_loader = DataLoader(train, batch_size=batch // world, sampler=sampler, drop_last=True, **extra)
    shard = Subset(val, range(rank, len(val), world))
    val_loader = DataLoader(shard, batch_size=cfg.task.eval_batch_size, shuffle=False, **extra)
    return train_loader, val_loader


class DevicePreprocess:
    """uint8 NCHW on the device -> normalised float, resized to ``size``, randomly erased (training only)."""

    def __init__(self, cfg, device: torch.device, channels_last: bool):
        from timm.data.random_erasing import RandomErasing

        norm = cfg.data.normalize
        self.mean = torch.tensor(norm.mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(norm.std, device=device).view(1, 3, 1, 1) * 255
        self.size = cfg.task.image_size
        aug = cfg.task.augment
        self.erase = RandomErasing(aug.reprob, mode=aug.remode, device=device) if aug.reprob > 0 else None
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, images: torch.Tensor, train: bool) -> torch.Tensor:
        x = images.float()
        if x.shape[-2:] != (self.size, self.size):  # CIFAR: 32 px -> the paper's 224 px, bilinear
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        x = (x - self.mean) / self.std
        if train and self.erase is not None:
            x = self.erase(x)
        return x.contiguous(memory_format=self.memory_format)
