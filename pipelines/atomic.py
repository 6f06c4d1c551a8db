"""The one way this project writes a file or a directory so that a reader, or a rerun after a kill, sees
the old version or the whole new one, never a part."""
from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator


@contextmanager
def open_atomic(path: Path) -> Iterator[BinaryIO]:
    """A binary file object whose content becomes ``path`` (flushed to disk, one rename) when the block
    ends without an exception; on an exception ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; outputs are readable like any other file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomic(path: Path, data: bytes | str) -> None:
    with open_atomic(path) as f:
        f.write(data.encode() if isinstance(data, str) else data)


def write_if_changed(path: Path, data: bytes) -> None:
    """write_atomic unless ``path`` already holds ``data`` (then its mtime stays, and nothing reruns)."""
    path = Path(path)
    if not (path.is_file() and path.read_bytes() == data):
        write_atomic(path, data)


def temp_dir_beside(dest: Path) -> Path:
    """An empty directory next to ``dest`` (same filesystem) to build its new content in."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()  # not mkdtemp: the usual permissions (umask), not 0700
    return tmp


def replace_dir(tmp: Path, dest: Path) -> None:
    """Put the finished directory ``tmp`` at ``dest``; an old ``dest`` is moved aside first and deleted
    after, and put back if the move fails."""
    tmp, dest = Path(tmp), Path(dest)
    old = None
    if dest.exists() or dest.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
        os.rename(dest, old / "content")
    try:
        os.rename(tmp, dest)
    except BaseException:
        if old is not None:
            os.rename(old / "content", dest)
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
