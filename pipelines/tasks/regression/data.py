"""Data of the regression task: a prepared table (data/processed/<name>.npz, pipelines/CONTRACT.md), its
train/test split from the seed alone, and standardisation from the training rows."""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from pipelines.errors import RunError


def load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    stage = f"dvc repro prepare@{path.stem}"
    if not path.is_file():
        raise RunError(f"{path} is missing: run `dvc repro` (its prepare stage makes it: {stage})")
    try:
        with np.load(path) as arrays:
            X, y = arrays["X"].astype(np.float64), arrays["y"].astype(np.float64)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        raise RunError(f"cannot read {path} ({type(err).__name__}: {str(err)[:120]}); rerun its prepare "
                       f"stage: {stage}") from None
    if X.ndim != 2 or y.shape != (len(X),) or not (np.isfinite(X).all() and np.isfinite(y).all()):
        raise RunError(f"{path} holds X {X.shape} and y {y.shape}, or non-finite values; rerun its prepare "
                       f"stage: {stage}")
    return X, y


def test_rows(rows: int, test_fraction: float) -> int:
    """How many of ``rows`` the split holds out for testing."""
    return max(1, round(rows * test_fraction))


def split(rows: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train/test indices from the seed alone, so baseline and GAL of one seed see the same split."""
    order = np.random.default_rng(seed).permutation(rows)
    n_test = test_rows(rows, test_fraction)
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def standardiser(values: np.ndarray, enabled: bool) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std of the training values (identity when disabled); constant columns keep std 1."""
    if not enabled:
        return np.zeros(values.shape[1:]), np.ones(values.shape[1:])
    std = values.std(axis=0)
    return values.mean(axis=0), np.where(std > 0, std, 1.0)
