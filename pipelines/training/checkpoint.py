"""Per-epoch training checkpoints: written atomically, verified and read back with
``torch.load(weights_only=True)``; and the lock that makes one process at a time the owner of a run.

A checkpoint holds only tensors and plain Python values (state dicts, numbers, strings, lists, dicts), so
loading it never runs pickled code. It is written atomically (pipelines.atomic): a kill at any moment, or a
full disk, leaves the old or the new checkpoint, whole. Its content is checked on load against the CRC-32
that ``torch.save``'s zip format stores for every record (torch itself never checks it): a flipped bit in a
weight is one line, not a resume to other numbers. (A CRC finds corruption, not a deliberate edit.)
"""
from __future__ import annotations

import errno
import fcntl
import os
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from pipelines.atomic import nearest_existing, open_atomic
from pipelines.errors import RunError, signals_held

LOCK_NAME = ".lock"  # beside last.pt


def check_writable(directory: Path) -> None:
    """Refuse, before any compute, a checkpoint or record folder that cannot be made or written; makes
    nothing."""
    directory, existing = Path(os.path.abspath(directory)), nearest_existing(directory)
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        why = "is not a directory" if not existing.is_dir() else "is not writable"
        raise RunError(f"cannot write in {directory}: {existing} {why}; make it a writable directory or set "
                       "root= elsewhere")


def save(state: dict[str, Any], path: Path) -> None:
    try:
        with signals_held(), open_atomic(path) as f:  # a stop request waits for the whole checkpoint
            torch.save(state, f)
    except OSError as err:
        kept = "the previous checkpoint is kept" if path.is_file() else "no checkpoint was kept"
        free = " (free some space)" if err.errno == errno.ENOSPC else ""
        raise RunError(f"cannot write checkpoint {path}: {err.strerror or err}{free}; {kept}: rerun the same "
                       "command to resume from it") from None


def load(path: Path) -> dict[str, Any] | None:
    """The checkpoint at ``path`` (on the CPU), or None when there is none."""
    if not path.is_file():
        return None
    redo = "delete it to start the run over"
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError) as err:
        raise RunError(f"checkpoint {path} is unreadable ({type(err).__name__}: {err}); {redo}") from None
    if damaged is not None:
        raise RunError(f"checkpoint {path} is corrupt: {damaged} does not match its checksum; {redo}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # objects weights_only refuses, or a format torch cannot read
        reason = (str(err).strip().splitlines() or [""])[0][:200]
        raise RunError(f"checkpoint {path} is unreadable ({type(err).__name__}: {reason}); {redo}") from None
    if not isinstance(state, dict) or "epoch" not in state:
        raise RunError(f"checkpoint {path} is not a training checkpoint of this pipeline; {redo}")
    return state


@contextmanager
def run_lock(directory: Path, run: str) -> Iterator[None]:
    """Hold the run's lock for the block; one line if another process holds it. The lock dies with its
    process, however it ends; flock works across hosts on file systems that support it (NFSv4, Lustre)."""
    check_writable(directory)
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EACCES):
                raise RunError(f"cannot lock {directory / LOCK_NAME}: {err.strerror or err}") from None
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise RunError(f"run {run} is already running ({holder} holds {directory / LOCK_NAME}); wait for "
                           "it to end, or stop it, before starting it again") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {os.uname().nodename}".encode(), 0)
        yield
    finally:
        os.close(fd)
