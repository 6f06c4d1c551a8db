"""The preflight's data: the workspace's prepared data where it was prepared for the profile planned, else
data made on the fly in the real on-disk format at the real image sizes, in a scratch root the runs read.

What a made dataset holds (the formats of pipelines/CONTRACT.md, Prepared data; only as many images as the
steps read, the class count and the image sizes real):
- CIFAR: {train,test}_{images,labels}.npy, 32 x 32 RGB;
- ImageNet: train/<wnid>/*.JPEG and val/<wnid>/*.JPEG, 500 x 375 (the most common ILSVRC size);
- COCO: train2017/ and val2017/ JPEGs of 640 x 480 (COCO's usual size), about 7 boxes each (COCO's mean), in
  annotations/instances_{train,val}2017.json;
- a regression table: X and y of the real shape (``data.source.shape``) in <name>.npz;
- Digits: X_train, y_train, X_test, y_test of the real split's sizes and pixel range in digits.npz.
Each with its <name>.json sidecar, as the prepare stages write it.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

IMAGENET_SIZE = (500, 375)
COCO_SIZE = (640, 480)
COCO_BOXES = 7
COCO_GAPS = {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}  # the ten ids 1..90 that COCO 2017 does not use


def real_sizes(data: DictConfig) -> tuple[int, int]:
    """(training, evaluation) images of the real dataset ``data`` (rows for a regression table: all of them)."""
    source = data.source
    if "counts" in source:
        return int(source.counts.train), int(source.counts.val)
    if "train" in source:
        return int(source.train), int(source.test)
    return int(source.shape[0]), int(source.shape[0])


def kind(data: DictConfig) -> str:
    if data.name.startswith("cifar"):
        return "cifar"
    if data.name in ("imagenet", "coco", "digits"):
        return data.name
    return "table"


def provide(data: DictConfig, profile: str, workspace: Path, root: Path, train: int, val: int) -> str:
    """Put dataset ``data`` under root/data/processed/: a link to the workspace's prepared copy when its sidecar
    says it was prepared for ``profile``, else ``train`` and ``val`` images made on the fly. How it was
    provided, in a few words."""
    processed, name = root / "data" / "processed", data.name
    processed.mkdir(parents=True, exist_ok=True)
    prepared = workspace / "data" / "processed"
    sidecar = prepared / f"{name}.json"
    if sidecar.is_file() and json.loads(sidecar.read_text()).get("profile") == profile:
        for path in prepared.glob(f"{name}*"):
            if path.stem == name:  # <name>/, <name>.json, <name>.npz; not cifar100 for cifar10
                (processed / path.name).symlink_to(path.resolve())
        return "prepared"
    rng = np.random.default_rng(0)
    made = {"cifar": _cifar, "imagenet": _imagenet, "coco": _coco, "digits": _digits, "table": _table}[kind(data)]
    made(data, processed, train, val, rng)
    (processed / f"{name}.json").write_text(json.dumps(
        {"name": name, "classes": int(data.get("num_classes") or 0), "profile": "preflight"}))
    return "made on the fly"


def _cifar(data, processed: Path, train: int, val: int, rng) -> None:
    folder = processed / data.name
    folder.mkdir()
    for split, n in (("train", train), ("test", val)):
        np.save(folder / f"{split}_images.npy", rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8))
        np.save(folder / f"{split}_labels.npy", rng.integers(0, data.num_classes, n, dtype=np.int64))


def _jpeg(rng, size: tuple[int, int]) -> bytes:
    """A photo-like JPEG: smooth colour fields and fine noise, so decoding costs what a real image costs."""
    from PIL import Image

    width, height = size
    coarse = Image.fromarray(rng.integers(0, 256, (height // 32, width // 32, 3), dtype=np.uint8))
    pixels = np.asarray(coarse.resize(size, Image.BICUBIC), dtype=np.int16)
    pixels = np.clip(pixels + rng.integers(-12, 13, pixels.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _imagenet(data, processed: Path, train: int, val: int, rng) -> None:
    classes = [f"n{k:08d}" for k in range(min(10, data.num_classes))]  # labels index the model's 1000 outputs
    for split, n in (("train", train), ("val", val)):
        for k in range(n):
            folder = processed / "imagenet" / split / classes[k % len(classes)]
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{split}_{k:08d}.JPEG").write_bytes(_jpeg(rng, IMAGENET_SIZE))


def _coco(data, processed: Path, train: int, val: int, rng) -> None:
    folder = processed / "coco"
    (folder / "annotations").mkdir(parents=True)
    categories = [{"id": i, "name": f"category {i}", "supercategory": "preflight"}
                  for i in range(1, 91) if i not in COCO_GAPS]
    width, height = COCO_SIZE
    next_id = 1
    for split, n in (("train", train), ("val", val)):
        (folder / f"{split}2017").mkdir()
        images, annotations = [], []
        for _ in range(n):
            image_id = next_id
            next_id += 1
            name = f"{image_id:012d}.jpg"
            (folder / f"{split}2017" / name).write_bytes(_jpeg(rng, COCO_SIZE))
            images.append({"id": image_id, "file_name": name, "width": width, "height": height})
            for _ in range(COCO_BOXES):
                w, h = (float(v) for v in rng.uniform(20, 300, 2))
                x, y = float(rng.uniform(0, width - w)), float(rng.uniform(0, height - h))
                annotations.append({"id": len(annotations) + 1 + 10 ** 6 * (split == "val"), "image_id": image_id,
                                    "category_id": categories[int(rng.integers(len(categories)))]["id"],
                                    "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0,
                                    "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]]})
        (folder / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(
            {"images": images, "annotations": annotations, "categories": categories}))


def _table(data, processed: Path, train: int, val: int, rng) -> None:
    rows, features = (int(v) for v in data.source.shape)
    X = rng.normal(size=(rows, features))
    y = X @ rng.normal(size=features) + rng.normal(size=rows)
    np.savez(processed / f"{data.name}.npz", X=X, y=y)


def _digits(data, processed: Path, train: int, val: int, rng) -> None:
    rows, pixels = (int(v) for v in data.source.shape)
    tests = round(rows * data.split.test_fraction)
    arrays = {}
    for part, count in (("train", rows - tests), ("test", tests)):
        arrays[f"X_{part}"] = rng.integers(0, 17, size=(count, pixels)).astype(np.float64)
        arrays[f"y_{part}"] = rng.integers(0, data.classes, size=count)
    np.savez(processed / "digits.npz", **arrays)

