"""What every prepare stage shares: its error, the run wrapper that reports a failure in one line and leaves no
outputs behind, and the checksum and file format of a prepared table (regression sets, Digits)."""
from __future__ import annotations

import hashlib
import io
import shutil
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np

from pipelines.config import hydra_main
from pipelines.errors import ConfigError, UserError, print_error


class PrepareError(UserError):
    """An expected failure (unparseable file, checksum mismatch); reported in one line."""


def content_sha256(X: np.ndarray, y: np.ndarray) -> str:
    """sha256 of a table's content: its shape, then X and y as little-endian float64 in C order.

    Exact, no rounding: the raw-file parsers and the CSV tables give bit-identical floats (the derived
    California features are the same float64 divisions scikit-learn does, and its CSV prints them in full).
    -0.0 is made 0.0 first: the two print differently but are the same value.
    """
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if X.ndim != 2 or y.shape != (X.shape[0],):
        raise ValueError(f"content_sha256 needs X (rows x features) and y (rows), got {X.shape} and {y.shape}")
    h = hashlib.sha256(b"gal-regression-table-v1\0")
    h.update(np.asarray(X.shape, dtype="<i8").tobytes())
    for a in (X, y):
        h.update(np.ascontiguousarray(a + 0.0, dtype="<f8").tobytes())
    return h.hexdigest()


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """An .npz (as np.savez writes) with fixed timestamps, so the same table always gives the same bytes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for key, a in arrays.items():
            with zf.open(zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0)), "w",
                         force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(a), allow_pickle=False)
    return buf.getvalue()


def remove_outputs(created: list[Path]) -> None:
    """Delete what a failed run wrote, and the folders it made for it when they are left empty."""
    for path in created:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    for folder in {p.parent for p in created}:
        try:
            folder.rmdir()
        except OSError:
            pass  # not empty: it holds something else


def run_stage(name: str, prepare: Callable[[list[Path]], dict], summary: Callable[[dict], str]) -> int:
    """Run ``prepare(created)``; 0 and a summary line on success, else one line on stderr and exit code 2."""
    from omegaconf.errors import OmegaConfBaseException

    created: list[Path] = []
    try:
        record = prepare(created)
    except BaseException as e:
        remove_outputs(created)
        if isinstance(e, OmegaConfBaseException):
            e = ConfigError(str(e).splitlines()[0])
        if isinstance(e, UserError):
            return print_error(f"prepare {name}", e)
        raise  # a bug: the traceback is what helps
    print(f"prepare {name}: {summary(record)}")
    return 0


def hydra_entry(run: Callable[..., int]) -> None:
    """``python -m pipelines.prepare.<x> data=<name> profile=<p>``: compose conf/prepare.yaml, then run."""
    hydra_main("prepare", "prepare", run)
