"""Fetch + prepare stage for CIFAR-10 and CIFAR-100 (python versions).

    python -m pipelines.prepare.cifar data=cifar10 profile=smoke [root=.]

Data source ``canonical`` fetches ``data.source.url`` (or the file of the same name from the mirror in env
GAL_DATA_MIRROR) into data/raw/<name>/, verified against ``data.source.md5``. Data source ``fixtures`` (the
smoke profile) writes a small synthetic archive in the exact CIFAR layout into data/fixtures/
(pipelines.prepare.fixtures.cifar_tgz) and fetches it through the same mirror code path, verified by the md5
of the generated file. Either way the archive is extracted safely (pipelines.fetch.extract) into a temporary
directory, its pickled batches are read, checked (members present, dict keys, uint8 N x 3072 images, label
counts and ranges, class names, image counts) and converted.

Prepared format, data/processed/<name>/:
    train_images.npy, test_images.npy   uint8, N x 32 x 32 x 3 (HWC, RGB), C order
    train_labels.npy, test_labels.npy   int64, N (CIFAR-100: the fine labels)
plus data/processed/<name>.json {name, classes, class_names, train, test, raw_md5, source, profile, identity}
and data/processed/<name>.manifest.tsv (the folder's identity and manifest: pipelines.hashing).
Why: plain .npy files open with ``np.load(path, mmap_mode="r")`` in microseconds, without unpickling or
decompressing anything, and a data loader (any number of workers) then reads images straight from the page
cache; uint8 HWC is what torchvision's transforms take (``ToTensor`` scales and moves channels), at 3 KB an
image: 150 MB for the whole of CIFAR, so it stays in memory. Compressed or pickled formats would be smaller
on disk but cost every epoch. The raw tarball in data/raw/ stays the DVC-tracked source of truth; the
prepared files are a derived, reproducible output (np.save writes the same bytes for the same arrays).

The pickles are read only after the archive's md5 has been verified, and with an unpickler that resolves
only the few globals a pickled numpy array needs (nothing else can be called while loading).

A failed run leaves no outputs (no processed files, sidecar, or fetched archive): one line on stderr and
exit code 2 (pipelines.errors).
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import NamedTuple

import numpy as np

from pipelines.atomic import replace_dir, write_atomic, write_if_changed
from pipelines.fetch import MIRROR_ENV, extract, fetch
from pipelines.hashing import digest, manifest_path, record_identity
from pipelines.prepare import fixtures
from pipelines.errors import ConfigError
from pipelines.prepare.stage import PrepareError, hydra_entry, run_stage

IMAGE_SHAPE = (32, 32, 3)  # H, W, C of the prepared arrays; the archive stores C, H, W flattened
PIXELS = 3 * 32 * 32


class Layout(NamedTuple):
    """Where things are in one CIFAR python archive."""
    folder: str                 # the archive's top folder
    train: tuple[str, ...]      # training batch files, in order
    test: tuple[str, ...]
    meta: str                   # the meta file
    names_key: bytes            # class names in the meta dict
    labels_key: bytes           # labels in a batch dict


LAYOUTS = {  # data.source.format -> layout
    "cifar10_python": Layout("cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",),
                             "batches.meta", b"label_names", b"labels"),
    "cifar100_python": Layout("cifar-100-python", ("train",), ("test",), "meta", b"fine_label_names",
                              b"fine_labels"),
}
FIXTURE_KINDS = {"cifar10_python": "cifar10", "cifar100_python": "cifar100"}  # -> fixtures.cifar_tgz kind


class Split(NamedTuple):
    images: np.ndarray  # uint8, N x 32 x 32 x 3
    labels: np.ndarray  # int64, N


class Dataset(NamedTuple):
    train: Split
    test: Split
    class_names: tuple[str, ...]


# ---------------------------------------------------------------- reading the archive


class _ArrayUnpickler(pickle.Unpickler):
    """pickle.Unpickler(encoding="bytes") that builds dicts, lists, bytes, numbers and numpy arrays only."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"unexpected global {module}.{name}")
        if module == "numpy.core.multiarray":  # written by numpy 1.x; numpy 2 keeps it in numpy._core
            module = "numpy._core.multiarray" if hasattr(np, "_core") else module
        return super().find_class(module, name)


def load_pickle(path: Path) -> dict:
    """One CIFAR pickle file as the dict ``pickle.load(f, encoding="bytes")`` gives."""
    try:
        with open(path, "rb") as f:
            obj = _ArrayUnpickler(f, encoding="bytes").load()
    except Exception as e:  # noqa: BLE001 - any failure to unpickle means a damaged file
        raise PrepareError(f"{path.name}: not a readable CIFAR pickle ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise PrepareError(f"{path.name}: expected a pickled dict, got {type(obj).__name__}")
    return obj


def read_batch(path: Path, labels_key: bytes, num_classes: int) -> Split:
    """One batch file -> images (N x 32 x 32 x 3 uint8) and labels (int64), checked."""
    batch = load_pickle(path)
    missing = [k.decode() for k in (b"data", labels_key) if k not in batch]
    if missing:
        raise PrepareError(f"{path.name}: batch has no {' or '.join(missing)} entry (keys: "
                           f"{sorted(k.decode(errors='replace') if isinstance(k, bytes) else str(k) for k in batch)})")
    data = batch[b"data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != PIXELS:
        what = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise PrepareError(f"{path.name}: data must be a uint8 N x {PIXELS} array, got {what}")
    try:
        labels = np.asarray(batch[labels_key])
    except (TypeError, ValueError) as e:
        raise PrepareError(f"{path.name}: {labels_key.decode()} is not a list of integers: {e}") from None
    if labels.ndim != 1 or labels.size != data.shape[0] or (labels.size and labels.dtype.kind not in "iu"):
        raise PrepareError(f"{path.name}: {labels_key.decode()} must be {data.shape[0]} integers (one per image), "
                           f"got {labels.dtype} array of shape {labels.shape}")
    labels = labels.astype(np.int64)
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        raise PrepareError(f"{path.name}: label {labels[bad[0]]} of image {bad[0]} is out of range "
                           f"0..{num_classes - 1} ({bad.size} such labels)")
    images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # CHW rows -> NHWC
    return Split(images, labels)


def read_class_names(path: Path, names_key: bytes, num_classes: int) -> tuple[str, ...]:
    meta = load_pickle(path)
    names = meta.get(names_key)
    if not isinstance(names, list) or not all(isinstance(n, bytes) for n in names):
        raise PrepareError(f"{path.name}: no list of class names under {names_key.decode()}")
    if len(names) != num_classes or len(set(names)) != num_classes:
        raise PrepareError(f"{path.name}: expected {num_classes} distinct class names, got {len(names)} "
                           f"({len(set(names))} distinct)")
    return tuple(n.decode("utf-8", errors="replace") for n in names)


def read_archive(archive: Path, fmt: str, num_classes: int) -> Dataset:
    """Extract a CIFAR python archive safely into a temporary directory next to it and read it, checked."""
    layout = LAYOUTS[fmt]
    archive = Path(archive)
    with tempfile.TemporaryDirectory(prefix=f".{archive.name}.", dir=archive.parent) as tmp:
        top = extract(archive, Path(tmp) / "x") / layout.folder
        wanted = (*layout.train, *layout.test, layout.meta)
        missing = [n for n in wanted if not (top / n).is_file()]
        if missing:
            raise PrepareError(f"{archive.name}: incomplete archive, {layout.folder}/{missing[0]} is missing "
                               f"({len(missing)} of {len(wanted)} files missing); fetch it again")
        names = read_class_names(top / layout.meta, layout.names_key, num_classes)
        splits = []
        for files in (layout.train, layout.test):
            parts = [read_batch(top / n, layout.labels_key, num_classes) for n in files]
            splits.append(Split(np.concatenate([p.images for p in parts]), np.concatenate([p.labels for p in parts])))
    return Dataset(splits[0], splits[1], names)


# ---------------------------------------------------------------- the stage


def write_arrays(folder: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write ``<key>.npy`` files into ``folder`` all at once: built in a temporary sibling, then renamed."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        tmp.chmod(0o755)
        for key, a in arrays.items():
            np.save(tmp / f"{key}.npy", a, allow_pickle=False)
        replace_dir(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_fixture(kind: str, path: Path, train: int, test: int, seed: int) -> str:
    """Write the smoke archive at ``path`` (kept as is when unchanged); return its checksum for fetch()."""
    if min(train, test) < 1:
        raise ConfigError(f"fixture sizes must be positive, got train={train} test={test}")
    content = fixtures.cifar_tgz(kind, train=train, test=test, seed=seed)
    write_if_changed(path, content)
    return f"md5:{hashlib.md5(content, usedforsecurity=False).hexdigest()}"


def prepare(cfg, created: list[Path]) -> dict:
    """Run the stage for cfg.data; return the sidecar record. Appends every output path to ``created``."""
    data, name, root = cfg.data, cfg.data.name, Path(cfg.root)
    source = data.source
    if cfg.data_source not in ("canonical", "fixtures"):
        raise ConfigError(f"data_source must be canonical or fixtures, got {cfg.data_source!r}")
    if source.format not in LAYOUTS:
        raise ConfigError(f"unknown data.source.format {source.format!r}; known: {', '.join(LAYOUTS)}")
    num_classes = int(data.num_classes)
    processed = root / "data" / "processed"
    out_dir, sidecar = processed / name, processed / f"{name}.json"
    raw_dir = root / "data" / "raw" / name
    archive_name = source.url.rstrip("/").rsplit("/", 1)[-1]
    raw = raw_dir / archive_name
    created += [out_dir, sidecar, manifest_path(sidecar), raw]
    shutil.rmtree(out_dir, ignore_errors=True)  # a run that fails must not leave an older result looking current
    sidecar.unlink(missing_ok=True)
    manifest_path(sidecar).unlink(missing_ok=True)

    try:
        if cfg.data_source == "fixtures":
            mirror = root / "data" / "fixtures"
            sizes = {"train": int(data.fixture.train), "test": int(data.fixture.test)}
            checksum = write_fixture(FIXTURE_KINDS[source.format], mirror / archive_name, sizes["train"],
                                     sizes["test"], int(data.fixture.seed))
            fetch(source.url, raw, checksum=checksum, mirror=str(mirror))
            origin = f"fixture:data/fixtures/{archive_name}"
        else:
            sizes = {"train": int(source.train), "test": int(source.test)}
            mirror = os.environ.get(MIRROR_ENV) or None
            fetch(source.url, raw, checksum=f"md5:{source.md5}", mirror=mirror)
            origin = f"mirror:{archive_name}" if mirror else source.url
    finally:
        try:
            (raw_dir / ".partial").rmdir()  # fetch()'s resume area: kept only while it holds a partial file
        except OSError:
            pass

    try:
        dataset = read_archive(raw, source.format, num_classes)
    except PrepareError as e:
        raise PrepareError(f"cannot read {origin}: {e}") from None
    for split, want in sizes.items():
        got = len(getattr(dataset, split).labels)
        if got != want:
            raise PrepareError(f"{origin}: {got} {split} images, expected {want}; the archive is incomplete or "
                               "not the one configured")
    write_arrays(out_dir, {"train_images": dataset.train.images, "train_labels": dataset.train.labels,
                           "test_images": dataset.test.images, "test_labels": dataset.test.labels})
    record = {"name": name, "classes": num_classes, "class_names": list(dataset.class_names),
              "train": len(dataset.train.labels), "test": len(dataset.test.labels), "raw_md5": digest(raw, "md5"),
              "source": origin, "profile": cfg.profile,
              "identity": record_identity(out_dir, stage=f"prepare_cifar@{name}")}
    write_atomic(sidecar, (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())
    return record


def run(cfg) -> int:
    return run_stage(cfg.data.get("name", "?"), lambda created: prepare(cfg, created), lambda r: (
        f"{r['train']} train + {r['test']} test images, {r['classes']} classes from {r['source']} "
        f"-> data/processed/{r['name']}/ (raw md5 {r['raw_md5'][:12]}...)"))


if __name__ == "__main__":
    hydra_entry(run)
