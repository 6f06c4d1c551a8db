"""Prepare stage for Digits, the one real image-classification set a CPU trains on in minutes (ours, not the
paper's: the "Beyond the paper" study, where GAL's output width is 10 and the published h does get gradients).

    python -m pipelines.prepare.digits data=digits profile=<p> [root=.]

The 1,797 8x8 handwritten digits ship inside scikit-learn (``sklearn.datasets.load_digits``): no download, the
same real data in every profile. The table is accepted only if its content checksum equals
``data.source.content_sha256``; the split is fixed (stratified, ``data.split``) and its own checksum is checked
against ``data.split.test_sha256``, so every run, seed and machine tests on the same images.

Outputs under ``root``: data/raw/digits/digits.csv.gz (the file load_digits reads, as the record of the input),
data/processed/digits.npz (X_train, y_train, X_test, y_test: float64 pixels 0..16 as shipped, int64 labels)
and data/processed/digits.json (+ its manifest, pipelines.hashing). A failed run leaves none of them: one line
on stderr, exit code 2.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from pipelines.atomic import write_atomic
from pipelines.errors import ConfigError
from pipelines.hashing import manifest_path, record_identity
from pipelines.prepare.stage import PrepareError, content_sha256, hydra_entry, npz_bytes, run_stage


def stratified_split(y: np.ndarray, test_fraction: float, seed: int) -> np.ndarray:
    """Sorted test indices: round(test_fraction * class size) of each class, drawn from ``seed`` alone."""
    rng = np.random.default_rng(seed)
    test = [rng.permutation(np.flatnonzero(y == label))[:round(test_fraction * np.sum(y == label))]
            for label in np.unique(y)]
    return np.sort(np.concatenate(test))


def indices_sha256(indices: np.ndarray) -> str:
    return hashlib.sha256(np.asarray(indices, dtype="<i8").tobytes()).hexdigest()


def prepare(cfg, created: list[Path]) -> dict:
    data, root = cfg.data, Path(cfg.root)
    if data.source.format != "sklearn_digits":
        raise ConfigError(f"data.source.format must be sklearn_digits, got {data.source.format!r}")
    fraction = data.split.test_fraction
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise ConfigError(f"data.split.test_fraction={fraction}: use a fraction between 0 and 1")
    npz, sidecar = root / "data" / "processed" / "digits.npz", root / "data" / "processed" / "digits.json"
    raw = root / "data" / "raw" / "digits" / "digits.csv.gz"
    created += [npz, sidecar, manifest_path(sidecar), raw]
    for old in (npz, sidecar, manifest_path(sidecar)):
        old.unlink(missing_ok=True)

    import sklearn
    from importlib import resources
    from sklearn.datasets import load_digits  # imported here: only this stage needs scikit-learn

    write_atomic(raw, (resources.files("sklearn.datasets.data") / "digits.csv.gz").read_bytes())
    digits = load_digits()
    X, y = digits.data.astype(np.float64), digits.target.astype(np.int64)
    content = content_sha256(X, y.astype(np.float64))
    if content != data.source.content_sha256:
        raise PrepareError(f"content checksum mismatch: scikit-learn {sklearn.__version__}'s load_digits gives "
                           f"{X.shape[0]} x {X.shape[1]} with content_sha256 {content}, expected "
                           f"{data.source.content_sha256}")
    test = stratified_split(y, float(fraction), int(data.split.seed))
    if indices_sha256(test) != data.split.test_sha256:
        raise PrepareError(f"the split (test_fraction {fraction}, seed {data.split.seed}) drew other test images "
                           f"(sha256 {indices_sha256(test)}) than data.split.test_sha256 names: this numpy draws "
                           "differently; pin the split's indices before trusting a comparison across machines")
    train = np.setdiff1d(np.arange(len(y)), test)
    write_atomic(npz, npz_bytes({"X_train": X[train], "y_train": y[train], "X_test": X[test], "y_test": y[test]}))
    record = {"name": "digits", "rows": int(len(y)), "features": int(X.shape[1]), "classes": int(y.max() + 1),
              "train": int(len(train)), "test": int(len(test)), "content_sha256": content,
              "test_sha256": indices_sha256(test), "profile": cfg.profile,
              "source": f"scikit-learn {sklearn.__version__}: sklearn.datasets.load_digits()"}
    record["identity"] = record_identity(npz, stage="prepare_digits")
    write_atomic(sidecar, (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())
    return record


def run(cfg) -> int:
    return run_stage("digits", lambda created: prepare(cfg, created), lambda r: (
        f"{r['train']} training and {r['test']} test images of {r['classes']} classes from {r['source']} "
        f"-> data/processed/digits.npz"))


if __name__ == "__main__":
    hydra_entry(run)
