"""Data of the digits task: the prepared split (data/processed/digits.npz, pipelines/prepare/digits.py) as float
tensors in memory, pixels scaled from 0..16 to 0..1."""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

from pipelines.errors import RunError

ARRAYS = ("X_train", "y_train", "X_test", "y_test")
PIXEL_MAX = 16.0  # load_digits' pixels are counts 0..16 (4x4 blocks of a 32x32 bitmap)


def load(path: Path, device: torch.device) -> tuple[torch.Tensor, ...]:
    """X_train, y_train, X_test, y_test: pixels as float32 rows of 64, labels as int64."""
    remake = "rerun its prepare stage: dvc repro prepare_digits"
    if not path.is_file():
        raise RunError(f"{path} is missing: run `dvc repro` (its prepare stage makes it: dvc repro prepare_digits)")
    try:
        with np.load(path) as arrays:
            X_train, y_train, X_test, y_test = (arrays[name] for name in ARRAYS)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        raise RunError(f"cannot read {path} ({type(err).__name__}: {str(err)[:120]}); {remake}") from None
    if X_train.ndim != 2 or X_train.shape[1:] != X_test.shape[1:] or len(y_train) != len(X_train) \
            or len(y_test) != len(X_test) or not (np.isfinite(X_train).all() and np.isfinite(X_test).all()):
        raise RunError(f"{path} holds X_train {X_train.shape}, X_test {X_test.shape} and labels of other lengths, "
                       f"or non-finite pixels; {remake}")
    pixels = lambda a: torch.tensor(a / PIXEL_MAX, dtype=torch.float32, device=device)  # noqa: E731
    labels = lambda a: torch.tensor(a, dtype=torch.int64, device=device)  # noqa: E731
    return pixels(X_train), labels(y_train), pixels(X_test), labels(y_test)
